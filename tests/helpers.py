"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from cooperllm_jax.models.common import hook, lookup

Q_D = 38  # the quadratic's dimension: 4 x 5 dense + 6 x 3 table


def padded_batch(tokenizer, texts, pad_id):
  """Right-padded int32 {'input_ids', 'attention_mask'} for texts, as the models expect."""
  encs = [tokenizer.encode(t).ids for t in texts]
  ids = np.full((len(encs), max(map(len, encs))), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for i, e in enumerate(encs):
    ids[i, :len(e)], mask[i, :len(e)] = e, 1
  return {'input_ids': ids, 'attention_mask': mask}


def quadratic_problem():
  """(A, c, theta): the SPD quadratic 0.5 (x - c)^T A (x - c) over a dense leaf and a table."""
  rng = np.random.default_rng(42)
  m = rng.standard_normal((Q_D, Q_D))
  a = m @ m.T / Q_D + 0.5 * np.eye(Q_D)                       # SPD, eigenvalues ~0.5 .. 4.5
  c = rng.standard_normal(Q_D)
  theta = {'q': {'w': rng.standard_normal((4, 5))}, 'e': {'token': rng.standard_normal((6, 3))}}
  return a, c, theta


def flat(tree):
  return jnp.concatenate([tree['q']['w'].ravel(), tree['e']['token'].ravel()])


def quadratic_loss(params, batch, perturb):
  """A tiny 'model': the dense group goes through the group hook, the table through the row hook
  (all of its rows, in a shuffled order, so rows are addressed by id)."""
  w = hook(perturb, 'q', params['q'])['w']
  order = jnp.array([3, 0, 5, 1, 4, 2], jnp.int32)
  rows = lookup(perturb, ('e', 'token'), params['e']['token'], order)
  rows = jnp.zeros_like(rows).at[order].set(rows)
  x = jnp.concatenate([w.ravel(), rows.ravel()]) - batch['c']
  return 0.5 * x @ batch['A'] @ x


def t_test_rejects(mean, se, target) -> bool:
  """Whether an estimator's sample `mean` (standard errors `se`) is inconsistent with `target`:
  some component's |t| > 5, or the sum of t^2 more than 5 sd above its chi^2_d mean."""
  t = (np.asarray(mean) - np.asarray(target)) / np.asarray(se)
  d = t.size
  return bool(np.abs(t).max() > 5 or (t ** 2).sum() > d + 5 * math.sqrt(2 * d))


def quadratic_setup():
  """(trainable, batch, grad, A, c, theta) of quadratic_problem in the form the estimators take."""
  a, c, theta = quadratic_problem()
  trainable = {k: {n: jnp.asarray(x, jnp.float32) for n, x in v.items()} for k, v in theta.items()}
  batch = {'A': jnp.asarray(a, jnp.float32), 'c': jnp.asarray(c, jnp.float32)}
  grad = a @ (np.asarray(flat(theta)) - c)
  return trainable, batch, grad, a, c, theta


REPO = pathlib.Path(__file__).resolve().parent.parent


def run_on_host_devices(script: str, devices: int = 8, timeout: int = 900) -> dict:
  """Runs `script` in a fresh CPU-only Python with `devices` simulated host devices (the flag
  must be set before jax starts) and returns the JSON its last 'RESULT ' line prints."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(lines[-1][len('RESULT '):])
