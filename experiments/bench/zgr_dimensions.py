r"""ZGR's estimates and convergence at real dimensions, on the synthetic problems with a known
gradient (experiments/bench/zgr_problems.py): the figures tests/test_zgr_dimensions.py checks at
test-sized probe counts, here with as many probes as asked (d = 1e7 draws 1e7 normals per probe).

  python -m experiments.bench.zgr_dimensions --dims=1e3,1e5,1e7 --probes=2048 --steps=16

For each problem and d: the regression estimates (zoo/mixing.py) of |V^T grad|^2 and |grad|^2 from
--probes guided SPSA probes (alpha --alpha, a cloud of --m directions, the first at cosine 0.8 with
the gradient), their standard errors and the truth; with --steps > 0 the gap (f - f*) / (f0 - f*)
after that many one-probe steps of plain ZO and of guided ZO with the default hyperparameters.
Prints one JSON object per line on stdout.
"""

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import zoo
from cooperllm_jax.zoo import guided, mixing
from experiments.bench.zgr_problems import PROBLEMS, cloud_basis, guidance

_DIMS = flags.DEFINE_list('dims', ['1e3', '1e5', '1e7'], 'Dimensions d.')
_PROBLEMS = flags.DEFINE_list('problems', ['quadratic', 'logistic'], 'Problems.')
_PROBES = flags.DEFINE_integer('probes', 2048, 'Probes for the estimates (0: none).')
_ALPHA = flags.DEFINE_float('alpha', 0.25, "The estimates' probe share alpha.")
_M = flags.DEFINE_integer('m', 2, 'Cloud basis size.')
_EPS = flags.DEFINE_float('eps', 1e-2, 'SPSA eps.')
_STEPS = flags.DEFINE_integer('steps', 0, 'Steps of the convergence comparison (0: none).')


def _keys(n, step=0):
  addrs = jnp.stack([jnp.full(n, step, jnp.int32), jnp.zeros(n, jnp.int32),
                     jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32)], -1)
  return zoo.address_keys(0, addrs)


def estimates(pb, n):
  grad = pb.grad64(np.asarray(pb.w0, np.float64))
  guide = guidance(cloud_basis(grad, _M.value, 0.8), _ALPHA.value)
  v = np.asarray(guide.basis['q']['w'], np.float64).T
  h = v.T @ grad
  estimate = zoo.make_estimate(pb.loss, zoo.Estimator(eps=_EPS.value))
  keys = _keys(n)
  t0 = time.time()
  g = jax.jit(lambda w, data, guide, keys: estimate({'q': {'w': w}}, {}, data, keys, guide)[0])(
      pb.w0, pb.data, guide, keys)
  e = mixing.regression(g, mixing.subspace_draws(keys, _M.value), guide)
  out = {'proj_sq': float(e.proj_sq), 'proj_sq_se': float(e.proj_sq_se),
         'proj_sq_true': float(h @ h),
         'grad_sq': float(e.grad_sq), 'grad_sq_se': float(e.grad_sq_se),
         'grad_sq_true': float(grad @ grad), 'seconds': time.time() - t0}
  out['proj_sq_rel_err'] = out['proj_sq'] / out['proj_sq_true'] - 1
  out['grad_sq_rel_err'] = out['grad_sq'] / out['grad_sq_true'] - 1
  return out


def convergence(pb, steps):
  lr = 1.0 / ((pb.d + 2) * pb.curvature)
  step_v = guided.step_ratio(guided.DEFAULT_LR_V, lr)
  step = zoo.make_zo_step(pb.loss, zoo.Estimator(eps=_EPS.value))
  noise = jnp.asarray(np.random.default_rng(5).standard_normal(pb.d), jnp.float32)

  def run(on):
    def body(s, w, data, noise):
      guide = None
      if on:
        g = pb.grad(w, data)
        c = g + 0.75 * jnp.linalg.norm(g) / jnp.linalg.norm(noise) * noise
        guide = guided.make_guidance({'q': {'w': (c / jnp.linalg.norm(c))[None]}}, jnp.ones(1),
                                     0.5, step_v=step_v)
      t, _, _ = step({'q': {'w': w}}, {}, data, _keys(1, s), lr, guide)
      return t['q']['w']
    f = jax.jit(lambda w, data, noise: jax.lax.fori_loop(
        0, steps, lambda s, w: body(s, w, data, noise), w))
    return pb.gap(f(pb.w0, pb.data, noise))

  return {'steps': steps, 'plain_gap': run(False), 'guided_gap': run(True)}


def main(argv):
  del argv
  for name in _PROBLEMS.value:
    for d in _DIMS.value:
      pb = PROBLEMS[name](int(float(d)))
      row = {'problem': name, 'd': pb.d, 'probes': _PROBES.value, 'alpha': _ALPHA.value}
      if _PROBES.value:
        row.update(estimates(pb, _PROBES.value))
      if _STEPS.value:
        row.update(convergence(pb, _STEPS.value))
      print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
