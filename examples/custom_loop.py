r"""Federated fine-tuning from your own loop with cooperllm_jax's public API.

  python examples/custom_loop.py                      # MiniLM on BBC News, ~3 min on 2 CPU cores
  python examples/custom_loop.py --rounds=2 --max_length=16 --local_steps=2

Every step the CLI takes, spelled out: data -> partition -> per-round client batches -> a jitted
round (clients in one call, then the edge's replay of their scalars) -> evaluation, twice:
plain zeroth-order clients (FedMeZO), then the same clients with the cloud's guidance (ZGR: the
cloud backprops on a public slice and the clients probe along its direction). The model, data and
partition are the packaged default run's, so the numbers are comparable with `make demo`'s.
"""

import argparse
from typing import Optional

import jax
import jax.numpy as jnp

import cooperllm_jax as cj


def prepare(max_length: int, seed: int = 0) -> tuple:
  """(pre, dataset, arrays, partition): the model, the data tokenized, and its split over 10
  clients with Dirichlet(0.5) label skew, a test split and the cloud's public slice."""
  dataset = cj.load_dataset('bbcnews')
  pre = cj.load_pretrained('minilm', num_labels=dataset.num_classes)
  arrays = pre.tokenize(dataset.texts, max_length=max_length)
  partition = cj.make_partition(dataset.labels, num_clients=10, scheme='dirichlet', alpha=0.5,
                                test_fraction=0.2, public_fraction=0.05, seed=seed)
  return pre, dataset, arrays, partition


def train(pre, dataset, arrays, partition, *, rounds: int, guided: bool, clients_per_round: int = 4,
          local_steps: int = 8, batch_size: int = 8, lr: float = 1e-2, lr_v: float = 0.1,
          alpha: float = 0.5, seed: int = 0) -> dict:
  """Trains the classifier head for `rounds` rounds; returns test accuracy before and after, and
  whether the edge's model equals a replay of the last round's uplinks under its guidance."""
  loss = cj.make_loss(pre.model)
  est = cj.Estimator(eps=1e-3, probes=1)               # one central SPSA probe per local step
  subset = cj.Subset('head')                           # what the clients train
  trainable, frozen = subset.split(pre.params)
  # The rounds donate (update in place) the trainable leaves: copy them, so that pre.params (whose
  # arrays split returns) stays usable for the next call.
  trainable = jax.tree.map(jnp.copy, trainable)
  round_fn = cj.make_round(cj.make_client_update(loss, est, subset), seed=seed)

  def accuracy(trainable):
    params = subset.materialize(frozen, trainable)
    return cj.evaluate(pre.model, params, arrays, dataset.labels, partition.test)['accuracy']

  if guided:   # the cloud: BP on its public slice at the global model, one direction a round
    public = cj.public_set(arrays, dataset.labels, partition.public)
    cloud = cj.make_cloud_step(loss, subset, cj.CloudConfig('gradient'))
    cloud_state, pool = cloud.init(trainable), cj.empty_pool(trainable, m=1)

  before = accuracy(trainable)
  for r in range(1, rounds + 1):     # rounds are numbered from 1, as the CLI numbers them
    sampled = cj.sample_clients(partition.num_clients, clients_per_round, seed, r)
    batches, counts = cj.round_batches(arrays, dataset.labels, partition.clients, sampled,
                                       steps=local_steps, batch_size=batch_size, seed=seed,
                                       round_index=r)
    guide = None
    if guided:
      public_batches = cj.public_batches(public, num_batches=2, batch_size=32, seed=seed,
                                         round_index=r)
      cloud_state, direction, _ = cloud.step(cloud_state, trainable, frozen, public_batches)
      pool = cj.push(pool, direction)
      basis, valid = cj.orthonormalize(pool)
      guide = cj.make_guidance(basis, valid, alpha, step_v=cj.step_ratio(lr_v, lr))
    start = jax.tree.map(jnp.copy, trainable)   # kept for the replay below: the round donates it
    out = round_fn(trainable, frozen, batches, counts, sampled, r, lr, guide=guide)
    trainable = out.trainable
  # The edge's update is a function of the uplinks (4-byte scalars) and the guidance alone:
  # anyone holding the round's ledger rebuilds the model bit for bit.
  rebuilt = round_fn.edge(start, out.received.uplink, out.received.client_weights, lr, guide)
  replayed = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(rebuilt),
                                                      jax.tree.leaves(trainable)))
  return {'before': before, 'after': accuracy(trainable), 'replayed': replayed,
          'scalars_up_per_client': int(out.uplinks.scalars[0].size)}


def main(argv: Optional[list] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=20)
  parser.add_argument('--local_steps', type=int, default=8)
  parser.add_argument('--max_length', type=int, default=32)
  args = parser.parse_args(argv)
  data = prepare(args.max_length)
  results = {}
  for name, guided in (('fedmezo (plain ZO)', False), ('cooperllm (ZGR)', True)):
    lr = 1e-2 if guided else 5e-2                    # each one's tuned rate (the default config's)
    results[name] = r = train(*data, rounds=args.rounds, guided=guided,
                              local_steps=args.local_steps, lr=lr)
    print(f'{name}: test accuracy {r["before"]:.3f} -> {r["after"]:.3f} after {args.rounds} '
          f'rounds; {r["scalars_up_per_client"]} float32 scalars up per client and round; the '
          f'edge equals a replay of them: {r["replayed"]}')
  return results


if __name__ == '__main__':
  main()
