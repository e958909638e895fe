"""A run's jitted entry points lower for TPU and for CUDA GPUs from this CPU-only host: the
clients' round, the edge's replay, the cloud's step on a data x model mesh, fedavg_bp's round, the
evaluation step, and the fused kernel in every layout and weight format.

jax.export(jax.jit(f), platforms=[p]) runs JAX's whole lowering for p, the Pallas kernel's included
(Mosaic TPU for 'tpu', Triton for 'cuda'): a block shape, scalar operand or op that a backend's
lowering rejects fails here. The programs are checked to hold the compiled kernel (its custom call),
not the interpreter. What only a device runs is left to experiments/bench/device.py: the backends'
own compilers (Mosaic's layout passes, Triton to PTX, XLA's) and the numbers they give.

Models are tiny (tests/test_perturb_impl.py's); the cloud's data x model mesh needs 8 devices, so
it runs in a subprocess with 8 simulated CPU devices, as tests/test_cloud.py's sharded run does.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import test_perturb_impl as tp
from helpers import run_on_host_devices
from cooperllm_jax import evaluation, zoo
from cooperllm_jax.config import Aggregation
from cooperllm_jax.federated import clients as fzo
from cooperllm_jax.federated.algorithms import fedavg_bp
from cooperllm_jax.federated.edge import edge_replay
from cooperllm_jax.kernels.fused_perturb import LAYOUTS, fused_perturb
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo import quantized

PLATFORMS = ('tpu', 'cuda')
# The kernel's custom call on each platform: Mosaic's on TPU, Triton's on CUDA.
KERNEL_CALL = {'tpu': 'tpu_custom_call', 'cuda': '__gpu$xla.gpu.triton'}
# jax.export refuses custom calls without a serialization-compatibility guarantee (Triton's); these
# tests check lowering, not the stability of a serialized artifact.
CHECKS = [export.DisabledSafetyCheck.custom_call(KERNEL_CALL['cuda'])]
MODEL = tp.ENCODER
# Trainable LoRA adapters (stacked: the kernel's 'flat' layout) and head (rank 2: 'rows').
SUBSET = zoo.Subset('lora', lora_rank=4, lora_targets=('attn/q',))
CLIENTS, SEED = 4, 7


def exported(fn, platform, *args, **kwargs) -> export.Exported:
  """Jitted `fn` exported for `platform` (its StableHLO: .mlir_module())."""
  return export.export(fn, platforms=[platform], disabled_checks=CHECKS)(*args, **kwargs)


def _split():
  return SUBSET.split(tp._params(MODEL), jax.random.key(1))  # pylint: disable=protected-access


def _round_batches():
  """{name: [C, S, B, T]}: every client gets the same 2 steps of 2 examples."""
  one = tp._batches(MODEL)  # pylint: disable=protected-access
  return {k: np.stack([v] * CLIENTS) for k, v in one.items()}


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('impl,guided,base', [
    ('xla', False, 'f32'), ('xla', True, 'int8'), ('xla', True, 'int4'),
    ('pallas', False, 'int8'), ('pallas', True, 'f32'), ('pallas', True, 'int4')])
def test_clients_round_lowers(platform, impl, guided, base):
  """The clients' round (lax.map over 2 vmapped clients at a time): the fused kernel on the 2-D
  trainable weights with impl='pallas', under guidance or not, over float or quantized frozen
  weights."""
  trainable, frozen = _split()
  frozen = quantized.quantize_frozen(frozen, base, group=16)
  est = zoo.Estimator(eps=1e-2, probes=1, perturb_impl=impl)
  update = fzo.make_client_update(make_loss(MODEL), est, SUBSET)
  clients = jax.jit(fzo.make_clients_fn(update, seed=SEED, chunk=2))
  kw = {'guide': tp._guide(trainable)} if guided else {}  # pylint: disable=protected-access
  text = exported(clients, platform, trainable, frozen, _round_batches(),
                  jnp.arange(CLIENTS, dtype=jnp.int32), jnp.int32(1), jnp.float32(1e-2),
                  **kw).mlir_module()
  assert (KERNEL_CALL[platform] in text) == (impl == 'pallas')


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('guided,rule', [(False, 'mean'), (True, 'mean'), (True, 'median')])
def test_edge_replay_lowers(platform, guided, rule):
  trainable, _ = _split()
  steps, probes = 2, 1
  uplinks = fzo.Uplink(jnp.zeros((CLIENTS, steps, probes, 4), jnp.int32),
                       jnp.ones((CLIENTS, steps, probes)), jnp.ones((CLIENTS, steps, probes)))
  replay = jax.jit(edge_replay, static_argnames=('distribution', 'shared', 'aggregation'))
  guide = tp._guide(trainable) if guided else None  # pylint: disable=protected-access
  exported(replay, platform, trainable, SEED, uplinks, jnp.full((CLIENTS,), 0.25),
           jnp.float32(1e-2), guide=guide, aggregation=Aggregation(rule))


@pytest.mark.parametrize('platform', PLATFORMS)
def test_fedavg_bp_round_lowers(platform):
  trainable, frozen = _split()
  round_fn = fedavg_bp.make_round(fedavg_bp.make_client_update(MODEL, optax.adam(1e-3), SUBSET),
                                  chunk=2)
  exported(round_fn, platform, trainable, frozen, _round_batches(),
           jnp.ones((CLIENTS,), jnp.float32))


@pytest.mark.parametrize('platform', PLATFORMS)
def test_evaluation_step_lowers(platform):
  # pylint: disable=protected-access
  batch = {k: v[0] for k, v in tp._batches(MODEL).items()}
  batch['weight'] = jnp.ones(batch['labels'].shape, jnp.float32)
  exported(evaluation.eval_batch, platform, MODEL, tp._params(MODEL), batch)


# --- the fused kernel on its own, every variant -------------------------------------------------

ROWS = 100  # ragged row blocks of 8 and of 32


def _kernel_inputs(variant, cols, m=2):
  """(arrays, formats) of fused_perturb for a [ROWS, cols] weight and an m-vector basis: arrays
  (abstract) w, basis and their scales, formats the static group and packing. 'float': bf16 w,
  float32 basis; 'int8': int8 w and basis in groups of 32 and 64; 'int4': packed int4 both, groups
  of 32."""
  s = jax.ShapeDtypeStruct
  if variant == 'float':
    return dict(w=s((ROWS, cols), jnp.bfloat16), basis=s((m, ROWS, cols), jnp.float32)), {}
  packed = variant == 'int4'
  values, vg = (cols // 2, 32) if packed else (cols, 64)
  return (dict(w=s((ROWS, values), jnp.int8), basis=s((m, ROWS, values), jnp.int8),
               w_scales=s((ROWS, cols // 32), jnp.float32),
               basis_scales=s((m, ROWS, cols // vg), jnp.float32)),
          dict(w_group=32, w_packed=packed, basis_group=vg, basis_packed=packed))


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('variant,cols', [('float', 1600), ('int8', 1600), ('int4', 2048)])
@pytest.mark.parametrize('blocks', [(32, 512), (8, 128)])  # the library's default, the smallest
def test_fused_kernel_lowers(platform, layout, variant, cols, blocks):
  """Every layout and weight format at the library's blocks and at the smallest (one tile):
  100 rows and 1600 columns leave ragged blocks; packed int4 needs cols / 2 in whole blocks."""
  leaf = keys_lib.leaf_key(keys_lib.address_key(SEED, (1, 0, 0, 0)), 'layers/attn/q/kernel')
  arrays, formats = _kernel_inputs(variant, cols)

  def run(arrays, u, h, offset):
    return fused_perturb(leaf_key=leaf, h=h, a=0.8, b=0.6, u=u, layout=layout,
                         block_rows=blocks[0], block_cols=blocks[1], row_offset=offset,
                         **arrays, **formats)

  text = exported(jax.jit(run), platform, arrays, jax.ShapeDtypeStruct((2,), jnp.float32),
                  jnp.float32(0.1), jnp.int32(3)).mlir_module()
  assert text.count(KERNEL_CALL[platform]) == 1


@pytest.mark.parametrize('platform', PLATFORMS)
def test_fused_kernel_lowers_under_vmap_of_the_weights_alone(platform):
  """Batched weights with shared scalars: vmap adds a grid axis (the clients' round batches the
  scalars too, a key per client, which test_clients_round_lowers covers)."""
  leaf = keys_lib.leaf_key(keys_lib.address_key(SEED, (1, 0, 0, 0)), 'layers/attn/q/kernel')
  run = jax.vmap(lambda w: fused_perturb(w, leaf, 0.1, 1.0, 0.0, layout='flat'))
  text = exported(jax.jit(run), platform,
                  jax.ShapeDtypeStruct((3, ROWS, 1600), jnp.float32)).mlir_module()
  assert text.count(KERNEL_CALL[platform]) == 1


# --- the cloud's step on a data x model mesh (8 simulated CPU devices) --------------------------

CLOUD_SCRIPT = r'''
import json, sys
import jax
sys.path.insert(0, 'tests')
import test_cloud as tc
import test_lowering as tl
from cooperllm_jax.cloud import CloudConfig, make_cloud_step
from cooperllm_jax.mesh import make_mesh
from cooperllm_jax.zoo import Subset

assert len(jax.devices()) == 8, jax.devices()
mesh = make_mesh(data=4, model=2)
out = {}
key_data = jax.random.key_data(jax.random.key(2))  # the trace estimate's probes
for mode, subset in [('gradient', Subset('lora', lora_rank=4)), ('finetune', Subset('full'))]:
  trainable, frozen = subset.split(tc._params(), jax.random.key(1))
  config = CloudConfig(mode, curvature=True, trace_probes=2, line_trials=2)
  cloud = make_cloud_step(tc.LOSS, subset, config, mesh=mesh, model=tc.MODEL)
  state, batches = cloud.init(trainable), tc._batches()
  step, _ = cloud.jit_on_mesh(trainable, frozen, batches)  # the program cloud.step runs
  for platform in tl.PLATFORMS:
    try:
      devices = tl.exported(step, platform, state, trainable, frozen, batches,
                            key_data).nr_devices
      out[f'{mode} {platform}'] = f'{devices} devices'
    except Exception as e:  # reported by the test, one line per failure
      out[f'{mode} {platform}'] = f'{type(e).__name__}: {e}'[:2000]
print('RESULT ' + json.dumps(out))
'''


def test_cloud_step_lowers_on_a_data_model_mesh():
  result = run_on_host_devices(CLOUD_SCRIPT, timeout=600)
  assert result == {f'{m} {p}': '8 devices' for m in ('gradient', 'finetune') for p in PLATFORMS}, \
      json.dumps(result, indent=1)
