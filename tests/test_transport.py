"""The round split at the transport: the edge prepares the messages, whatever carries them brings
back the replies that arrived, the edge applies them. Clients run one by one on their own message
(as each end device of a deployment does) give the in-process round's models bit for bit; a reply
that does not arrive is a dropout the ledger records and rebuilds."""

import jax
import jax.numpy as jnp
import numpy as np

import test_zo_algorithms as tz
from cooperllm_jax.federated import ledger as ledger_lib
from cooperllm_jax.federated.algorithms import make_algorithm
from cooperllm_jax.federated.round import Replies


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _one_by_one(alg, state, messages, batches):
  """Each sampled client's reply computed alone from its own message and batches."""
  rows = []
  for i in range(len(messages.clients)):
    mine = jax.tree.map(lambda x: x[i:i + 1], batches)
    reply = alg.run_clients(state, messages.to(i), mine)
    rows.append((jax.tree.map(lambda x: x[0], reply.uplink), reply.losses[0]))
  return rows


def test_clients_replying_one_by_one_give_the_in_process_rounds_bit_for_bit():
  """cooperllm (the cloud's guidance in the messages) over three rounds."""
  h = tz.history('cooperllm', rounds=3)
  alg = make_algorithm(tz.config('cooperllm'), tz.MODEL, tz.PUBLIC)
  state = alg.init(jax.tree.map(jnp.asarray, tz.PARAMS_NP))
  for r in range(1, 4):
    state, messages = alg.prepare(state, tz.CLIENT_IDS, tz.COUNTS, r)
    rows = _one_by_one(alg, state, messages, h['inputs'][r - 1])
    state, result = alg.apply(state, messages, Replies.collect(rows, tz.STEPS, alg.zo.est.probes))
    assert _bits(state._replace(frozen=None)) == _bits(h['states'][r]._replace(frozen=None))
    assert _bits(result.uplink) == _bits(h['results'][r - 1].uplink)


def test_a_reply_that_does_not_arrive_is_a_dropout_the_ledger_rebuilds(tmp_path):
  alg = make_algorithm(tz.config('fedmezo'), tz.MODEL)
  start = alg.init(jax.tree.map(jnp.asarray, tz.PARAMS_NP))
  ledger = ledger_lib.Ledger(tmp_path)
  ledger.start({'algorithm': 'fedmezo'})
  state, probes = jax.tree.map(jnp.copy, start), alg.est.probes
  for r, lost in ((1, (1,)), (2, (0, 1, 2))):
    before = tz.snapshot(state.trainable)
    state, messages = alg.prepare(state, tz.CLIENT_IDS, tz.COUNTS, r)
    rows = _one_by_one(alg, state, messages, tz.round_batches(r))
    arrived = [None if i in lost else row for i, row in enumerate(rows)]
    replies = Replies.collect(arrived, tz.STEPS, probes)
    state, result = alg.apply(state, messages, replies)
    kept = np.isin(np.arange(3), lost, invert=True)
    np.testing.assert_array_equal(result.sent, kept)
    np.testing.assert_allclose(result.client_weights, tz.COUNTS * kept / max(
        (tz.COUNTS * kept).sum(), 1), rtol=1e-6)
    assert result.metrics['missing'] == len(lost)
    assert (result.uplink_bytes[~kept] == 0).all() and (result.forwards[~kept] == 0).all()
    assert (result.uplink.weights[~kept] == 0).all()
    assert (result.uplink_bytes[kept] > 0).all()
    ledger.append(r, tz.CLIENT_IDS, result, messages.lr, None, ledger_lib.GUARD_NONE)
    if r == 1:   # the edge replays the two replies that came, FedAvg-weighted between them
      present = alg.edge_update(jax.tree.map(jnp.copy, start._replace(frozen=None)),
                                jax.tree.map(lambda x: x[kept], replies.uplink),
                                result.client_weights[kept])
      assert tz.max_rel_diff(state.trainable, present.trainable) < 1e-6
      assert tz.max_rel_diff(state.trainable, before) > 1e-3
    else:        # none arrived: the model stays put
      assert _bits(before) == _bits(state.trainable)
  rebuilt = list(ledger_lib.rebuild(ledger, alg.edge_update, start._replace(frozen=None)))
  assert [r for r, _ in rebuilt] == [1, 2]
  assert _bits(rebuilt[-1][1].trainable) == _bits(state.trainable)
