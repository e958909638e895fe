"""Models as pure functions of a plain params pytree: BERT-family encoders, LLaMA-family decoders."""

from cooperllm_jax.models.common import Perturb, classification_loss
from cooperllm_jax.models.decoder import Decoder, DecoderConfig
from cooperllm_jax.models.encoder import Encoder, EncoderConfig
from cooperllm_jax.models.pretrained import Pretrained, load_pretrained
from cooperllm_jax.models.spec import ParamSpec, abstract_params, count_params, logical_axes

__all__ = ['Perturb', 'classification_loss', 'Decoder', 'DecoderConfig', 'Encoder',
           'EncoderConfig', 'Pretrained', 'load_pretrained', 'ParamSpec', 'abstract_params',
           'count_params', 'logical_axes']
