"""Numerical parity of our Flax-free JAX models with transformers' PyTorch models on real weights.

Tolerances: float32 everywhere (JAX matmuls at 'highest' precision). MiniLM's hidden states are
O(1) and agree to ~1e-6; we assert 1e-4. SmolLM2's logits are O(10) after 30 layers; summation-order
differences grow with depth, so we assert 1e-4 relative to the logit scale (max |logit|).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from cooperllm_jax import assets
from helpers import padded_batch
from cooperllm_jax.models.spec import path_str

pytestmark = pytest.mark.slow

TEXTS = ['The Fed raised interest rates again on Wednesday.',
         'A short one.',
         'Manchester United beat Arsenal 2-1 in a thrilling Premier League match at Old Trafford.']


def test_minilm_matches_torch_bert(minilm):
  ref = transformers.BertModel.from_pretrained(str(assets.MINILM.path())).eval()
  batch = padded_batch(minilm.tokenizer, TEXTS, minilm.pad_id)
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(batch['input_ids']).long(),
              attention_mask=torch.tensor(batch['attention_mask']).long())
  jb = jax.tree.map(jnp.asarray, batch)
  ours = np.asarray(jax.jit(minilm.model.hidden)(minilm.params, jb))
  mask = batch['attention_mask'].astype(bool)
  err = np.abs(ours - out.last_hidden_state.numpy())[mask].max()
  assert err < 1e-4, err
  pooled = minilm.model.pool(minilm.params['head'], jnp.asarray(ours), jb['attention_mask'])
  assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() < 1e-4


def _torch_llama_from_ours(pre):
  """A transformers LlamaForCausalLM holding exactly our params (HF layout: kernels transposed)."""
  c = pre.model.cfg
  cfg = transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
      rope_theta=c.rope_theta, tie_word_embeddings=True, max_position_embeddings=c.max_positions)
  model = transformers.LlamaForCausalLM(cfg).eval()
  names = {'attn/q/kernel': 'self_attn.q_proj.weight', 'attn/k/kernel': 'self_attn.k_proj.weight',
           'attn/v/kernel': 'self_attn.v_proj.weight', 'attn/o/kernel': 'self_attn.o_proj.weight',
           'mlp/gate/kernel': 'mlp.gate_proj.weight', 'mlp/up/kernel': 'mlp.up_proj.weight',
           'mlp/down/kernel': 'mlp.down_proj.weight', 'attn_norm/scale': 'input_layernorm.weight',
           'mlp_norm/scale': 'post_attention_layernorm.weight'}
  state = {'model.embed_tokens.weight': np.asarray(pre.params['embed']['token']),
           'model.norm.weight': np.asarray(pre.params['final_norm']['scale'])}
  for path, leaf in jax.tree_util.tree_flatten_with_path(pre.params['layers'])[0]:
    leaf = np.asarray(leaf)
    for i in range(c.num_layers):
      w = leaf[i].T if path_str(path).endswith('kernel') else leaf[i]
      state[f'model.layers.{i}.{names[path_str(path)]}'] = w
  state['lm_head.weight'] = state['model.embed_tokens.weight']
  model.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()})
  return model


def _torch_logits(model, batch):
  with torch.no_grad():
    return model(input_ids=torch.tensor(batch['input_ids']).long(),
                 attention_mask=torch.tensor(batch['attention_mask']).long()).logits.numpy()


def _assert_logits_close(ours, ref, mask):
  scale = np.abs(ref[mask]).max()
  err = np.abs(ours - ref)[mask].max()
  assert err < 1e-4 * scale, (err, scale)


def test_smollm2_matches_torch_llama_same_weights(smollm2):
  batch = padded_batch(smollm2.tokenizer, TEXTS, smollm2.pad_id)
  ours = np.asarray(jax.jit(smollm2.model.lm_logits)(smollm2.params, jax.tree.map(jnp.asarray, batch)))
  ref = _torch_logits(_torch_llama_from_ours(smollm2), batch)
  _assert_logits_close(ours, ref, batch['attention_mask'].astype(bool))


@pytest.fixture(scope='module')
def hf_gguf_smollm2():
  """transformers' own GGUF loader: independent dequantization and Q/K un-permutation."""
  pytest.importorskip('accelerate')
  path = assets.SMOLLM2.path()
  tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
  return tok, model.eval()


def test_smollm2_matches_transformers_gguf_loader(smollm2, hf_gguf_smollm2):
  _, ref_model = hf_gguf_smollm2
  batch = padded_batch(smollm2.tokenizer, TEXTS, smollm2.pad_id)
  ours = np.asarray(jax.jit(smollm2.model.lm_logits)(smollm2.params, jax.tree.map(jnp.asarray, batch)))
  _assert_logits_close(ours, _torch_logits(ref_model, batch), batch['attention_mask'].astype(bool))


def test_gguf_tokenizer_matches_transformers(smollm2, hf_gguf_smollm2):
  ref_tok, _ = hf_gguf_smollm2
  texts = TEXTS + ['Numbers 12345 and 3.14, émigré café — “quotes”\n\ttabs  double  spaces',
                   '<|im_start|>user\nHi there<|im_end|>', "it's we'll they've  \n\n end"]
  for text in texts:
    assert smollm2.tokenizer.encode(text).ids == ref_tok(text).input_ids, text
    ids = smollm2.tokenizer.encode(text).ids
    assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_smollm2_greedy_next_token_is_sensible(smollm2, hf_gguf_smollm2):
  ref_tok, ref_model = hf_gguf_smollm2
  for prompt, expected in [('The capital of France is', ' Paris'),
                           ('One, two, three, four,', ' five')]:
    batch = padded_batch(smollm2.tokenizer, [prompt], smollm2.pad_id)
    ours = int(jax.jit(smollm2.model.next_token_logits)(smollm2.params, batch)[0].argmax())
    ref = int(_torch_logits(ref_model, batch)[0, -1].argmax())
    assert ours == ref
    assert smollm2.tokenizer.decode([ours]) == expected
