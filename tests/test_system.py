"""The system model: device profiles, per-stage FLOPs and bytes, the SPC timeline, the clock."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cooperllm_jax import zoo
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.models.decoder import Decoder, DecoderConfig
from cooperllm_jax.models.encoder import Encoder, EncoderConfig
from cooperllm_jax.models.spec import abstract_params
from cooperllm_jax.system import clock as clock_lib
from cooperllm_jax.system import codec as codec_lib
from cooperllm_jax.system import profiles as pr
from cooperllm_jax.system import timeline as tl
from cooperllm_jax.system import workload as wl


def _device(tier, flops=1e9, mbps=8.0, latency_ms=0.0):
  return pr.DeviceProfile(tier, tier, flops, 1.0, mbps, mbps, latency_ms)


def _equal_stages_plan(num, example_flops, trainable, nbytes, latency_ms=0.0, cloud_flops=1e9):
  """num equal stages, one client; 8 Mbit/s = 1e6 B/s links, 1 GFLOP/s devices."""
  stages = tuple(wl.Stage(f's{i}', example_flops, trainable) for i in range(num))
  client = tl.ClientWork(_device('end', latency_ms=latency_ms), forwards=1)
  return tl.RoundPlan(stages, 1, (client,), _device('cloud', cloud_flops, latency_ms=latency_ms),
                      _device('edge', latency_ms=latency_ms), guidance_bytes=(nbytes,) * num,
                      pool_size=1)


@pytest.mark.parametrize('example_flops, nbytes', [(1e9, 2e6),   # links dominate: t = 2 s, c = 1 s
                                                   (3e9, 1e6)])  # the client dominates
def test_pipelining_matches_the_hand_calculation(example_flops, nbytes):
  # Per stage: the cloud codes d = 1000 values (8 FLOPs each at 1 MFLOP/s: e = 8 ms), each link
  # carries nbytes at 1e6 B/s (t), the client computes example_flops + d (30 + 2 + 2) FLOPs (c).
  num, d = 6, 1000
  plan = _equal_stages_plan(num, example_flops, d, nbytes, cloud_flops=1e6)
  e = wl.ENCODE_FLOPS * d / 1e6
  t = nbytes / 1e6
  c = (example_flops + d * (wl.DIRECTION_FLOPS + 2 + 2) + wl.DECODE_FLOPS * d) / 1e9
  sequential = num * (e + 2 * t + c)    # forwards=1, steps=1, no update FLOPs: nothing after
  pipelined = e + 2 * t + c + (num - 1) * max(e, t, c)
  assert tl.round_seconds(plan, pipelined=False) == pytest.approx(sequential, rel=1e-12)
  assert tl.round_seconds(plan, pipelined=True) == pytest.approx(pipelined, rel=1e-12)
  assert pipelined < sequential


def test_latency_is_paid_once_per_message_and_overlaps_when_pipelined():
  # Link-bound, 10 ms access latency per device: a cloud->edge or edge->client message arrives
  # 20 ms after it leaves, the upload too. Sequential: one message per hop; pipelined: the
  # latencies of later stages hide behind the next stage's transmission.
  num, t, lat = 4, 2.0, 0.02
  plan = _equal_stages_plan(num, 1e3, 0, 2e6, latency_ms=10.0)
  c = 1e3 / 1e9
  upload = 0.0 + lat                        # 0 bytes up, then the latency
  sequential = num * t + lat + num * t + lat + num * c + upload
  pipelined = t + lat + t + lat + (num - 1) * t + c + upload
  assert tl.round_seconds(plan, pipelined=False) == pytest.approx(sequential, rel=1e-12)
  assert tl.round_seconds(plan, pipelined=True) == pytest.approx(pipelined, rel=1e-12)


def test_simulate_serializes_a_resource_first_come_first_served():
  tasks = [tl.Task('a', 'x', 2.0), tl.Task('b', 'y', 1.0, delay=0.5), tl.Task('e', 'z', 1.0),
           tl.Task('c', 'x', 1.0, ('b',)), tl.Task('d', 'x', 1.0, ('e',), delay=0.25)]
  ev = tl.simulate(tasks)
  assert (ev['a'].start, ev['a'].end) == (0.0, 2.0)
  assert ev['d'].start == 2.0                     # ready at 1, waits for 'a'
  assert ev['c'].start == 3.0                     # ready at 1.5: after 'd', which was ready first
  assert ev['d'].arrival == 3.25 and tl.makespan(ev) == 4.0
  with pytest.raises(ValueError, match='unknown dependencies'):
    tl.simulate([tl.Task('a', 'x', 1.0, ('zz',))])
  with pytest.raises(ValueError, match='cycle'):
    tl.simulate([tl.Task('a', 'x', 1.0, ('b',)), tl.Task('b', 'x', 1.0, ('a',))])


def test_lagged_cloud_backprop_leaves_the_critical_path():
  plan = _equal_stages_plan(3, 1e9, 10, 1e5)
  slow = dataclasses.replace(plan, cloud_flops=5e9)          # 5 s of backprop on the cloud
  now = tl.round_seconds(slow)
  lagged = tl.round_seconds(dataclasses.replace(slow, cloud_lag=1))
  assert now == pytest.approx(tl.round_seconds(plan) + 5.0)
  assert lagged == pytest.approx(max(tl.round_seconds(plan), 5.0), rel=1e-6)  # codes go first


# -- FLOPs and bytes of the real model shapes ---------------------------------------------------

ENC = EncoderConfig(vocab_size=97, hidden_size=128, num_layers=1, num_heads=4,
                    intermediate_size=512, max_positions=64, num_labels=3)
DEC = DecoderConfig(vocab_size=97, hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                    head_dim=32, intermediate_size=384, label_token_ids=(1, 2, 3))


@pytest.mark.parametrize('model', [Encoder(ENC), Decoder(DEC)], ids=['encoder', 'decoder'])
def test_forward_flops_match_xla_cost_analysis(model):
  """One layer (XLA counts a scan's body once): the analytic count is within 10% of XLA's, which
  also counts norms, softmax and activations."""
  batch, seq = 4, 32
  params = abstract_params(model.specs(), jnp.float32)
  data = {'input_ids': jax.ShapeDtypeStruct((batch, seq), jnp.int32),
          'attention_mask': jax.ShapeDtypeStruct((batch, seq), jnp.int32)}
  cost = jax.jit(model.logits).lower(params, data).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  ours = batch * wl.total(wl.model_stages(model, {}, seq), 'example_flops')
  assert 0.9 * xla < ours <= 1.02 * xla, (ours, xla)


def _tiny_trainable(mode):
  model = Encoder(EncoderConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=2,
                                intermediate_size=64, max_positions=64, num_labels=3))
  params = model.init(jax.random.key(0))
  trainable, _ = zoo.Subset(mode).split(params, jax.random.key(1))
  return model, trainable


@pytest.mark.parametrize('mode', ['full', 'lora', 'head'])
def test_stages_partition_the_trainable_weights(mode):
  model, trainable = _tiny_trainable(mode)
  stages = wl.model_stages(model, trainable, 16)
  assert [s.name for s in stages] == ['embed', 'layer_0', 'layer_1', 'layer_2', 'head']
  d = sum(x.size for x in jax.tree.leaves(trainable))
  assert sum(s.trainable for s in stages) == d
  assert len({s.trainable for s in stages[1:-1]}) == 1          # layers are alike
  if mode == 'lora':   # rank 8 on q and v (32 x 32): the merge W + A @ B in every forward
    assert stages[1].forward_flops == 2 * (2 * 32 * 8 * 32)
  if mode == 'head':
    assert [s.trainable for s in stages] == [0, 0, 0, 0, 32 * 3 + 3]


@pytest.mark.parametrize('fmt', ['f32', 'int8', 'int4'])
def test_stage_guidance_bytes_add_up_to_the_coded_basis(fmt):
  """A stage is coded as its own message: the stages' bytes are the whole basis' bytes up to the
  per-message block scales (f32 has none: exact)."""
  _, trainable = _tiny_trainable('full')
  stages = wl.model_stages(Encoder(EncoderConfig(vocab_size=97, hidden_size=32, num_layers=3,
                                                 num_heads=2, intermediate_size=64,
                                                 max_positions=64, num_labels=3)), trainable, 16)
  m = 2
  codec = codec_lib.LeafCodec(fmt)
  basis = jax.tree.map(lambda x: jax.ShapeDtypeStruct((m,) + x.shape, jnp.float32), trainable)
  whole = codec_lib.tree_nbytes(basis, codec)
  staged = sum(wl.stage_guidance_bytes(s, codec, m) for s in stages)
  leaves = len(jax.tree.leaves(trainable))
  assert whole <= staged <= whole + 4 * m * 3 * leaves
  if fmt == 'f32':
    assert staged == whole == 4 * m * sum(x.size for x in jax.tree.leaves(trainable))


# -- profiles and the clock ---------------------------------------------------------------------

def test_packaged_profiles_cover_the_tiers_and_links_use_the_slower_side():
  profiles = pr.load_profiles()
  assert {'phone_midrange', 'jetson_orin_nano', 'edge_server', 'cloud_gpu'} <= set(profiles)
  assert {p.tier for p in profiles.values()} == set(pr.TIERS)
  phone, edge = profiles['phone_midrange'], profiles['edge_server']
  down = pr.link(edge, phone, share=4)
  assert down.bandwidth == min(edge.uplink_mbps / 4, phone.downlink_mbps) * 1e6 / 8
  assert down.latency == (edge.latency_ms + phone.latency_ms) / 1e3


def test_profile_files_are_checked(tmp_path):
  bad = tmp_path / 'p.json'
  bad.write_text(json.dumps({'pi': {'tier': 'end', 'flops': 1e9, 'memory_gib': 1}}))
  with pytest.raises(ConfigError, match="'pi' .* lacks uplink_mbps, downlink_mbps, latency_ms"):
    pr.load_profiles(str(bad))
  bad.write_text(json.dumps({'pi': {'tier': 'end', 'flops': -1, 'memory_gib': 1,
                                    'uplink_mbps': 1, 'downlink_mbps': 1, 'latency_ms': 0}}))
  with pytest.raises(ConfigError, match='flops must be a finite number > 0'):
    pr.load_profiles(str(bad))
  bad.write_text('{')
  with pytest.raises(ConfigError, match='not valid JSON'):
    pr.load_profiles(str(bad))


def test_client_devices_follow_the_shares_and_the_seed():
  profiles = pr.load_profiles()
  devices = clock_lib.client_devices('phone_midrange:0.7,jetson_orin_nano:0.3', profiles, 10, 0)
  names = [d.name for d in devices]
  assert names.count('phone_midrange') == 7 and names.count('jetson_orin_nano') == 3
  again = clock_lib.client_devices('phone_midrange:0.7,jetson_orin_nano:0.3', profiles, 10, 0)
  other = clock_lib.client_devices('phone_midrange:0.7,jetson_orin_nano:0.3', profiles, 10, 1)
  assert [d.name for d in again] == names and [d.name for d in other] != names
  with pytest.raises(ConfigError, match='share must be > 0'):
    clock_lib.client_devices('phone_midrange:0', profiles, 10, 0)


def test_link_guidance_budget_is_what_the_slowest_link_carries_during_a_step():
  # One stage of 1 GFLOP per example, 2 passes a step on 1 GFLOP/s devices: 2 s of compute (plus
  # 10 weights' z); the edge's 8 Mbit/s split between 2 clients: 5e5 B/s each.
  stage = wl.Stage('s', 1e9, 10)
  clock = clock_lib.SimulatedClock(
      stages=(stage,), devices=[_device('end'), _device('end', flops=2e9)], cloud=_device('cloud'),
      edge=_device('edge'), batch_size=1, steps=4, pool_size=1, step_passes=2)
  compute = 2 * (1e9 + 10 * (wl.DIRECTION_FLOPS + 2 + 2)) / 1e9
  # Every client must hide its transfer: the faster one (1 s of compute) sets the budget.
  assert clock.guidance_budget([0, 1]) == int(5e5 * compute / 2)
  assert clock.guidance_budget([0]) == int(1e6 * compute)        # alone: the whole 8 Mbit/s


def _minilm_full_plan(fmt, client='phone_midrange'):
  """MiniLM's shapes, full fine-tuning, one FedSGD step of 8 x 128 tokens, m = 1, 4 clients."""
  model = Encoder(EncoderConfig(num_labels=5))
  trainable = abstract_params(model.specs(), jnp.float32)
  profiles = pr.load_profiles()
  clock = clock_lib.SimulatedClock(
      stages=wl.model_stages(model, trainable, 128), devices=[profiles[client]] * 4,
      cloud=profiles['cloud_gpu'], edge=profiles['edge_server'], batch_size=8, steps=1,
      pool_size=1, guidance_codec=codec_lib.LeafCodec(fmt), cloud_examples=64)
  ones = np.ones(4, np.int64)
  return clock.plan(2, np.arange(4), 2 * ones, 0 * ones, 8 * ones, 0 * ones, ones > 0, ones,
                    ones > 0)


def test_spc_and_dtc_shorten_a_phone_round_on_the_real_model_shapes():
  seconds = {(fmt, p): tl.round_seconds(_minilm_full_plan(fmt), p)
             for fmt in ('f32', 'int4') for p in (False, True)}
  assert seconds['f32', True] < seconds['f32', False]
  assert seconds['int4', True] < seconds['int4', False]
  assert seconds['int4', True] < seconds['f32', True]
  # f32 guidance of 22.7M weights over the phone's 40 Mbit/s downlink: over 4 * 22.7e6 B / 5e6 B/s
  # = 18 s sequentially, and the round cannot beat the transfer.
  assert seconds['f32', True] > 4 * 22.7e6 / 5e6


def test_the_edge_does_not_wait_for_clients_that_sent_nothing():
  profiles = pr.load_profiles()
  model = Encoder(EncoderConfig(num_labels=5))
  stages = wl.model_stages(model, {'head': {'classifier': {
      'kernel': jax.ShapeDtypeStruct((384, 5), jnp.float32)}}}, 32)
  fast, slow = profiles['jetson_orin_nano'], profiles['phone_midrange']
  clock = clock_lib.SimulatedClock(stages=stages, devices=[fast, slow], cloud=profiles['cloud_gpu'],
                                   edge=profiles['edge_server'], batch_size=8, steps=2)
  n = np.full(2, 4)
  both = clock.plan(1, [0, 1], n, 0 * n, n, 0 * n, np.array([True, True]), n // 2, n > 0)
  fast_only = clock.plan(1, [0, 1], n, 0 * n, n, 0 * n, np.array([True, False]), n // 2,
                         np.array([True, False]))
  assert [w.device.name for w in fast_only.clients] == ['jetson_orin_nano']
  assert tl.round_seconds(fast_only) < tl.round_seconds(both)
  # The straggler sets the pace: the round with both equals the phone's own critical path.
  tasks = tl.simulate(tl.round_tasks(both))
  assert tl.makespan(tasks) == pytest.approx(tasks['edge aggregate'].end)
  assert tasks['client 1 upload'].arrival > tasks['client 0 upload'].arrival


def test_backprop_clients_pay_forward_backward_and_adamw():
  dev = _device('end', flops=1e9)
  stage = wl.Stage('model', 1e6)
  plan = tl.RoundPlan((stage,), 4, (tl.ClientWork(dev, forwards=2, steps=2, backwards=2,
                                                  update_flops=5e6),),
                      _device('cloud'), _device('edge'))
  ev = tl.simulate(tl.round_tasks(plan))
  compute = ev['client 0 model'].end - ev['client 0 model'].start
  rest = ev['client 0 rest'].end - ev['client 0 rest'].start
  assert compute == pytest.approx(4e6 / 1e9)                        # step 1's forward, batch 4
  assert rest == pytest.approx((4e6 + 2 * 2 * 4e6 + 5e6) / 1e9)     # step 2 fwd, 2 bwd, updates


def test_dtc_keeps_f32_where_the_transfer_hides_and_compresses_where_it_would_stall():
  # Per stage d = 1e5 weights: f32 = 400 kB, int8 ~ 101.6 kB, int4 ~ 51.6 kB over a 1e6 B/s link.
  d = 100_000
  leaves = (('layers/w', (d,)),)
  def plan(example_flops):
    stages = (wl.Stage('embed', 0.0), wl.Stage('layer_0', example_flops, d, leaves=leaves))
    client = tl.ClientWork(_device('end', flops=1e9), forwards=2)
    return tl.RoundPlan(stages, 1, (client,), _device('cloud'), _device('edge'),
                        guidance_bytes=(0, 1), pool_size=1)
  perturb = 2 * d * (wl.DIRECTION_FLOPS + 2 + 2)      # two forwards regenerate z and V u
  assert tl.dtc_formats(plan(0.5e9 - perturb / 2))[0] == ('f32', 'f32')   # 1 s compute > 0.4 s
  assert tl.dtc_formats(plan(0.06e9))[0] == ('f32', 'int8')               # ~0.13 s
  formats, sizes = tl.dtc_formats(plan(0.0))
  assert formats == ('f32', 'int4') and sizes == (0, wl.stage_guidance_bytes(
      plan(0.0).stages[1], codec_lib.LeafCodec('int4'), 1))             # nothing hides: coarsest


def test_spc_experiment_writes_its_table_and_chart(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'experiments.spc', f'--workdir={tmp_path}',
                         '--models=minilm', '--subsets=lora', '--clients=phone_midrange',
                         '--gantt=minilm,lora,phone_midrange'], cwd=repo, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads((tmp_path / 'results.json').read_text())['rounds']
  assert len(rows) == 1 and rows[0]['pipelined_f32_s'] < rows[0]['sequential_f32_s']
  assert (tmp_path / 'gantt.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert '| minilm | lora | phone_midrange |' in (tmp_path / 'table.md').read_text()


def test_a_frozen_prefix_runs_once_per_step_whatever_the_probes():
  dev = _device('end', flops=1e9)
  stages = (wl.Stage('body', 1e6, shared=True), wl.Stage('head', 1e3, 10))
  plan = tl.RoundPlan(stages, 2, (tl.ClientWork(dev, forwards=8, steps=2),), _device('cloud'),
                      _device('edge'), guidance_bytes=(0, 40), pool_size=1)
  for pipelined in (True, False):
    ev = tl.simulate(tl.round_tasks(plan, pipelined))
    body = ev['client 0 body' if pipelined else 'client 0 shared prefix']
    assert body.end - body.start == pytest.approx(2e6 / 1e9)        # once, not 4 times
  head = 4 * (2 * 1e3 + 10 * (wl.DIRECTION_FLOPS + 2 + 2))        # 4 passes of step 1, perturbed
  ev = tl.simulate(tl.round_tasks(plan))
  assert ev['client 0 head'].end - ev['client 0 head'].start == pytest.approx(
      (head + wl.DECODE_FLOPS * 10) / 1e9)
  assert ev['client 0 rest'].end - ev['client 0 rest'].start == pytest.approx(
      (2e6 + head) / 1e9)                                           # step 2
  assert [s.shared for s in wl.model_stages(*_tiny_trainable('head'), 16)] == [True] * 4 + [False]


@pytest.mark.parametrize('module, flag, message', [
    ('experiments.spc', '--clients=laptop', "unknown device profile 'laptop'"),
    ('experiments.spc', '--batch=0', 'must be >= 1'),
    ('experiments.spc', '--gantt=a,b', '--gantt=a,b must name one'),
    ('experiments.bench.device_memory', '--models=nope', "unknown models ['nope']"),
    ('experiments.bench.device_memory', '--subsets=most', "unknown trainable mode 'most'"),
])
def test_system_entry_points_reject_bad_flags_in_one_line(tmp_path, module, flag, message):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = [f'--workdir={tmp_path}'] if module == 'experiments.spc' else []
  proc = subprocess.run([sys.executable, '-m', module, *workdir, flag], cwd=repo,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-1500:]
  assert 'Traceback' not in proc.stderr and not list(tmp_path.iterdir())
