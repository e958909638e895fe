"""The GGUF loader on tiny files written with gguf.GGUFWriter from a tiny random torch LLaMA.

Q and K are written with llama.cpp's row permutation (convert_hf_to_gguf.py's `permute`), so F32
parity with torch proves the loader undoes it, with GQA (2 KV heads for 4 query heads). The parity
model uses initializer_range 0.2 so attention is far from uniform and a wrong RoPE shows.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import padded_batch

gguf = pytest.importorskip('gguf')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from tokenizers import (  # pylint: disable=g-import-not-at-top,g-multiple-import
    Tokenizer, decoders, models, pre_tokenizers, trainers)

from cooperllm_jax.errors import ConfigError, LoaderError
from cooperllm_jax.models.gguf import GGUFFile
from cooperllm_jax.models.pretrained import load_pretrained
from cooperllm_jax.models.spec import path_str

Q = gguf.GGMLQuantizationType
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']   # CONTROL tokens, ids 0-2
CORPUS = ['The capital of France is Paris.', 'One, two, three, four, five: 12345 numbers.',
          "It's a small model; we'll test the tokenizer and the loader.",
          'Sport, business, politics, entertainment and tech news.']
TEXTS = ['The capital of France is', 'One', "we'll test the small loader, 2024."]
VOCAB = 300
HEADS, KV_HEADS = 4, 2
# Rows of 64 and 128: multiples of the 32-weight quantization blocks.
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=500.0,
              rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=2)
LAYER = {'attn_norm/scale': ('input_layernorm', 'attn_norm'),
         'attn/q/kernel': ('self_attn.q_proj', 'attn_q'),
         'attn/k/kernel': ('self_attn.k_proj', 'attn_k'),
         'attn/v/kernel': ('self_attn.v_proj', 'attn_v'),
         'attn/o/kernel': ('self_attn.o_proj', 'attn_output'),
         'mlp_norm/scale': ('post_attention_layernorm', 'ffn_norm'),
         'mlp/gate/kernel': ('mlp.gate_proj', 'ffn_gate'),
         'mlp/up/kernel': ('mlp.up_proj', 'ffn_up'),
         'mlp/down/kernel': ('mlp.down_proj', 'ffn_down')}
TOP = {'embed/token': ('model.embed_tokens', 'token_embd'),
       'final_norm/scale': ('model.norm', 'output_norm'), 'lm_head/kernel': ('lm_head', 'output')}


@functools.cache
def _tokenizer():
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  assert tok.get_vocab_size() == VOCAB
  return tok


@functools.cache
def _torch_model(tied: bool = True, init: float = 0.2):
  """A seeded tiny LLaMA; norm scales jittered around 1 so a swapped norm would show."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      tie_word_embeddings=tied, initializer_range=init, **CONFIG))
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def _permute(w, n_head):
  """llama.cpp's convert_hf_to_gguf.py permute: HF rotate-half rows -> interleaved RoPE rows."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _gguf_tensors(model):
  """GGUF name -> float32 array in GGUF's numpy [out, in] layout, Q/K rows permuted."""
  state = _state(model)
  out = {}
  for ours, (hf, name) in TOP.items():
    if ours != 'lm_head/kernel' or not model.config.tie_word_embeddings:
      out[f'{name}.weight'] = state[f'{hf}.weight']
  for i in range(CONFIG['num_hidden_layers']):
    for ours, (hf, name) in LAYER.items():
      w = state[f'model.layers.{i}.{hf}.weight']
      if ours in ('attn/q/kernel', 'attn/k/kernel'):
        w = _permute(w, HEADS if ours == 'attn/q/kernel' else KV_HEADS)
      out[f'blk.{i}.{name}.weight'] = w
  return out


def _write(path, model=None, *, quant=None, omit=(), replace=None, arch='llama',
           tokenizer_model='gpt2', pre='gpt2', add_bos=False, skip_meta=()):
  """Writes `model` (default: the tied one) as a tiny GGUF; `quant` quantizes every 2-D tensor,
  norms stay F32 as in llama.cpp."""
  c = CONFIG
  w = gguf.GGUFWriter(str(path), arch)
  meta = {'block_count': c['num_hidden_layers'], 'context_length': c['max_position_embeddings'],
          'embedding_length': c['hidden_size'], 'feed_forward_length': c['intermediate_size'],
          'head_count': HEADS, 'head_count_kv': KV_HEADS,
          'rope_dimension_count': c['hidden_size'] // HEADS, 'rope_freq_base': c['rope_theta'],
          'layer_norm_rms_eps': c['rms_norm_eps'], 'vocab_size': VOCAB}
  for key, value in meta.items():
    if key not in skip_meta:
      getattr(w, f'add_{key}')(value)
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre(pre)
  tok = json.loads(_tokenizer().to_str())
  vocab = sorted(tok['model']['vocab'], key=tok['model']['vocab'].get)
  w.add_token_list(vocab)
  w.add_token_merges([' '.join(m) for m in tok['model']['merges']])
  w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL
                     for t in vocab])
  w.add_bos_token_id(c['bos_token_id'])
  w.add_eos_token_id(c['eos_token_id'])
  w.add_pad_token_id(c['pad_token_id'])
  w.add_add_bos_token(add_bos)
  tensors = dict(_gguf_tensors(model or _torch_model()), **(replace or {}))
  for name, arr in tensors.items():
    if name in omit:
      continue
    if quant is not None and arr.ndim == 2:
      w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
    else:
      w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _batch(pre):
  batch = padded_batch(pre.tokenizer, TEXTS, pre.pad_id)
  assert len(set(batch['attention_mask'].sum(1))) == len(TEXTS)   # really padded
  return batch


def _ours(pre, batch):
  return np.asarray(jax.jit(pre.model.lm_logits)(pre.params, jax.tree.map(jnp.asarray, batch)))


def _theirs(model, batch):
  with torch.no_grad():
    return model(input_ids=torch.tensor(batch['input_ids']).long(),
                 attention_mask=torch.tensor(batch['attention_mask']).long()).logits.numpy()


@pytest.mark.parametrize('tied', [True, False])
def test_f32_matches_torch(tied, tmp_path):
  model = _torch_model(tied)
  pre = load_pretrained(str(_write(tmp_path / 'tiny.gguf', model)))
  c = pre.model.cfg
  assert (c.num_heads, c.num_kv_heads, c.head_dim, c.tie_embeddings) == (HEADS, KV_HEADS, 16, tied)
  assert (c.rope_theta, c.rms_norm_eps, c.vocab_size) == (500.0, pytest.approx(1e-5), VOCAB)
  assert ('lm_head' in pre.params) == (not tied)
  batch = _batch(pre)
  ours, ref = _ours(pre, batch), _theirs(model, batch)
  mask = batch['attention_mask'].astype(bool)
  assert np.abs(ref[mask]).max() > 1.0   # O(1) logits: 1e-4 is a tight bound
  err = np.abs(ours - ref)[mask].max()
  assert err < 1e-4, err


# RMS logit error relative to the RMS logit, quantized vs F32 model (at transformers' default init
# 0.02; at 0.2 the random net is chaotic and 4-bit noise decorrelates it). For Gaussian weights in
# blocks of 32 (max ~2.1 sigma) the rounding step is max/127 for Q8_0, max/8 for Q4_0 and range/15
# for Q4_1: ~0.5%, ~8% and ~8% RMS error per weight. About ten quantized matmuls lie between a token
# and its logits, their errors adding roughly in quadrature: measured 0.9%, 17% and 16% (seed 0).
# The bounds are 2x that.
QUANT_TOLERANCE = {Q.Q8_0: 0.02, Q.Q4_0: 0.35, Q.Q4_1: 0.35}


@pytest.mark.parametrize('quant', list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quantized_dequantizes_exactly(quant, tmp_path):
  model = _torch_model(tied=False, init=0.02)
  pre = load_pretrained(str(_write(tmp_path / 'tiny.gguf', model, quant=quant)))
  state = _state(model)
  # Quantization blocks run along rows, so quantizing the permuted Q/K and un-permuting equals
  # quantizing the HF weight: the expectation needs no permutation code.
  def expect(w):
    return gguf.quants.dequantize(gguf.quants.quantize(w, quant), quant) if w.ndim == 2 else w

  for path, leaf in jax.tree_util.tree_flatten_with_path(pre.params)[0]:
    name = path_str(path)
    if name.startswith('layers/'):
      hf = LAYER[name[len('layers/'):]][0]
      ws = [expect(state[f'model.layers.{i}.{hf}.weight'])
            for i in range(CONFIG['num_hidden_layers'])]
      want = np.stack([w.T if name.endswith('kernel') else w for w in ws])
    else:
      w = expect(state[f'{TOP[name][0]}.weight'])
      want = w.T if name.endswith('kernel') else w
    np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=name)
  batch = _batch(pre)
  mask = batch['attention_mask'].astype(bool)
  ref = _theirs(model, batch)[mask]
  rel = np.sqrt(np.square(_ours(pre, batch)[mask] - ref).mean() / np.square(ref).mean())
  assert 0 < rel < QUANT_TOLERANCE[quant], rel


TOKENIZER_TEXTS = TEXTS + [
    'Numbers 12345 and 3.14, émigré café — “quotes”\n\ttabs  double  spaces',
    '<|im_start|>user\nHi there<|im_end|>', "it's we'll they've  \n\n end"]


@pytest.mark.parametrize('pre_name', ['gpt2', 'llama-bpe'])
def test_tokenizer_matches_transformers(pre_name, tmp_path):
  path = _write(tmp_path / 'tiny.gguf', pre=pre_name)
  tok = load_pretrained(str(path)).tokenizer
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  for text in TOKENIZER_TEXTS:
    ids = tok.encode(text).ids
    assert ids == ref(text).input_ids, text
    assert tok.decode(ids, skip_special_tokens=False) == text
  assert tok.encode('<|im_start|>').ids == [1]   # CONTROL tokens stay whole


def test_label_words(tmp_path):
  path = str(_write(tmp_path / 'tiny.gguf'))
  pre = load_pretrained(path, label_words=['the', 'and'])
  vocab = _tokenizer().get_vocab()
  assert pre.model.cfg.label_token_ids == (vocab['Ġthe'], vocab['Ġand'])
  with pytest.raises(ConfigError, match='do not start with distinct tokens'):
    load_pretrained(path, label_words=['tech', 'test'])   # both start with 'Ġte'


def test_tokenizer_adds_bos_when_asked(tmp_path):
  tok = load_pretrained(str(_write(tmp_path / 'tiny.gguf', add_bos=True))).tokenizer
  assert tok.encode('One').ids[0] == CONFIG['bos_token_id']
  assert tok.encode('One', add_special_tokens=False).ids[0] != CONFIG['bos_token_id']


def _message(exc_info):
  message = str(exc_info.value)
  assert '\n' not in message, message
  return message


def test_missing_file(tmp_path):
  with pytest.raises(LoaderError) as info:
    load_pretrained(str(tmp_path / 'missing.gguf'))
  assert 'nor an existing path' in _message(info)
  with pytest.raises(LoaderError) as info:
    GGUFFile(tmp_path / 'missing.gguf')
  assert 'no such GGUF file' in _message(info)


def test_garbage_file(tmp_path):
  path = tmp_path / 'garbage.gguf'
  path.write_bytes(b'this is not a GGUF file at all' * 10)
  with pytest.raises(LoaderError) as info:
    load_pretrained(str(path))
  assert 'not a readable GGUF file' in _message(info)


def test_truncated_file(tmp_path):
  path = _write(tmp_path / 'tiny.gguf')
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(LoaderError) as info:
    load_pretrained(str(path))
  assert 'not a readable GGUF file' in _message(info)


def test_missing_tensor(tmp_path):
  path = _write(tmp_path / 'tiny.gguf', omit=('blk.1.ffn_up.weight',))
  with pytest.raises(LoaderError) as info:
    load_pretrained(str(path))
  assert "missing tensor 'blk.1.ffn_up.weight'" in _message(info)


def test_wrong_shape(tmp_path):
  bad = {'blk.1.attn_k.weight': np.zeros((48, 64), np.float32)}
  path = _write(tmp_path / 'tiny.gguf', replace=bad)
  with pytest.raises(LoaderError) as info:
    load_pretrained(str(path))
  assert ("'blk.1.attn_k.weight' for 'layers/attn/k/kernel' has shape (48, 64), expected (32, 64)"
          in _message(info))


def test_missing_metadata(tmp_path):
  path = _write(tmp_path / 'tiny.gguf', skip_meta=('feed_forward_length',))
  with pytest.raises(LoaderError) as info:
    load_pretrained(str(path))
  assert "missing metadata 'llama.feed_forward_length'" in _message(info)


@pytest.mark.parametrize('arch,tokenizer_model', [('gpt2', 'gpt2'), ('gemma', 'llama')])
def test_unsupported_architecture(arch, tokenizer_model, tmp_path):
  path = _write(tmp_path / 'tiny.gguf', arch=arch, tokenizer_model=tokenizer_model)
  with pytest.raises(LoaderError) as info:
    load_pretrained(str(path))
  assert f'architecture {arch!r} is not supported' in _message(info)
