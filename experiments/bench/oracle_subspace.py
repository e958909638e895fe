r"""The oracle study: can a cloud-built subspace V make the private data count?

From cloud_only's final model (the benchmark's picked AdamW rate, its 40 rounds, its seed) the edge
steps for the benchmark's rounds (the same sampled clients and batches) with the *exact* private
FedSGD gradient g (the clients' sample-weighted mean batch gradient) projected onto a candidate V:

    sgd:   theta <- theta - lr V V^T g          (what an unbiased subspace ZO estimator estimates)
    adam:  theta <- theta - V adam(V^T g)        (Adam on the m coordinates)

No zeroth-order noise: this bounds what clients probing V could do. The rate is picked per
(V, m) from a 5-value grid by final validation accuracy (the test split is read only for the
table). Candidates, all orthonormal [d, m] over the trainable leaves (LoRA + head):

  pool       the cloud's last m public mean gradients (CooperLLM's pool with pool_size m),
             refreshed every round at the current model (one push per round)
  history    the cloud's last m AdamW updates of its own training (fixed)
  pca        top-m principal directions (uncentered) of the per-example public gradients at the
             start (GEP's anchor subspace)
  pca_adam   the same in the cloud's Adam-preconditioned coordinates, mapped back
  pca_drop2  PCs 3 .. m + 2: the two sharpest directions dropped
  head       the classifier's biases, then outer(feature PC j, class c): the principal directions
             of the unlabeled public features times class indicators
  random     a random orthonormal V (the control)
  full       V = I: the unprojected private gradient (the headroom of this step rule)

Two diagnostics the cloud cannot build (they read the private data), bounds for an m-dim V:

  private_pca  top-m principal directions of the private per-example gradients at the start
  full_path    top-m principal directions of full's own steps (at full's picked rate). Meant to
               say whether the headroom lives in m dimensions; with the adam rule the steps are
               near sign vectors whose principal directions are mostly per-round noise, so it
               is a weak bound (docs/subspace.md)

Estimates of h = V^T g (--estimates): `exact` (the oracle), or what the clients' probes give,
--probes per sampled client and round (1: the ZO controls' budget), each measuring only the
directional derivative d_i = g_i . V u_i of its own batch gradient g_i (a central difference at
small eps, to O(eps^2)):

  gaussian     u_i ~ N(0, I_m): h = sum_i w_i d_i u_i (unbiased, w the FedAvg weights)
  coordinates  u_i = e_j with j = (round * C + i) mod m, an orthogonal design across the round's
               clients: h_j = the weighted mean of d_i over the clients on j (0 if none)

The realized gain of a V against its exact oracle is the protocol's mechanism check.

For each V: the gap closed, (acc - acc_cloud_only) / (acc_fedavg_bp - acc_cloud_only) on the
test split (fedavg_bp: the benchmark's committed runs, backprop on the clients from the
pretrained model), and two cheap predictors at the start model: the subspace distance to the
private gradients' top-m principal subspace (Gu, Kamath, Wu 2023: sqrt(1 - |V^T U|_F^2 / m)) and
the share of the mean private gradient's squared norm that V captures.

  python -m experiments.bench.oracle_subspace --settings=rt_shifted_minilm_lora --seeds=0
  python -m experiments.bench.oracle_subspace --stage=report

Every (V, m, rule, rate) run is one JSON file under --out/<setting>/seed=<s>/; finished runs are
read back, so the study resumes across sessions. The cloud's training is cached (--cache).
"""

import itertools
import json
import math
import pathlib
import sys
import time
from typing import Optional

from absl import app
from absl import flags
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cooperllm_jax import config as config_lib
from cooperllm_jax.cloud.bp import CloudConfig, make_cloud_step
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.evaluation import evaluate
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated.edge import fedavg_weights
from cooperllm_jax.io import save_npz_atomic, write_text_atomic
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.run.task import load_task
from cooperllm_jax.zoo.spsa import loss_at
from experiments.benchmark_settings import SETTINGS, Plan
from experiments.configs import demo
from experiments.variants import apply_override

CANDIDATES = ('pool', 'history', 'pca', 'pca_adam', 'pca_drop2', 'head', 'random', 'private_pca',
              'full_path', 'full')
GRIDS = {'sgd': (0.01, 0.03, 0.1, 0.3, 1.0), 'adam': (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}

_PRIVATE_EXAMPLES = 256   # private per-example gradients for the subspace distance
_CHUNK = 16               # per-example gradients computed this many at a time


# ---- the setting: cloud_only's config, task and trained model ------------------------------------

def run_config(setting: str, seed: int, bench: pathlib.Path) -> config_lib.RunConfig:
  """cloud_only's run config in the benchmark at its picked rate and this seed."""
  plan = Plan.of(setting)
  picked = {m: r['picked'] for m, r in read_sweep(bench, setting).items()}
  if 'cloud_only' not in picked:
    raise ConfigError(f'{setting}: cloud_only has no pick in {bench / setting}/sweep.json')
  algorithm, overrides = plan.variant('cloud_only', picked['cloud_only'], seed, picked)
  config = demo.get_config(algorithm)
  for o in overrides:
    apply_override(config, o)
  return config_lib.parse(config)


def fedavg_bp_accuracy(setting: str, seed: int, bench: pathlib.Path) -> Optional[float]:
  """fedavg_bp's committed test accuracy at its pick and this seed (None: not run)."""
  record = read_sweep(bench, setting)
  if 'fedavg_bp' not in record:
    return None
  path = (bench / setting / 'runs' / 'fedavg_bp' / f'lr={record["fedavg_bp"]["picked"]:g}' /
          f'seed={seed}' / 'summary.json')
  return json.loads(path.read_text())['accuracy_after'] if path.exists() else None


def read_sweep(bench: pathlib.Path, setting: str) -> dict:
  """The benchmark's sweep.json of a setting (each method's picked value)."""
  path = bench / setting / 'sweep.json'
  if not path.exists():
    raise ConfigError(f'{path}: no sweep (run experiments.benchmark --stage=sweep first)')
  return json.loads(path.read_text())


def fit_bias(logits: np.ndarray, labels: np.ndarray, steps: int = 50) -> np.ndarray:
  """The offset b [C] minimizing the mean cross-entropy of softmax(logits + b) (Newton's method;
  the loss is convex in b, and flat along b + c 1, which the damping fixes)."""
  num_classes = logits.shape[1]
  b, onehot = np.zeros(num_classes), np.eye(num_classes)[labels]
  for _ in range(steps):
    z = logits + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - onehot).mean(0)
    hess = np.diag(p.mean(0)) - np.einsum('ni,nj->ij', p, p) / len(p)
    b -= np.linalg.solve(hess + 1e-6 * np.eye(num_classes), grad)
  return b


class Study:
  """One (setting, seed): the task, flat views of the trainable leaves, the jitted gradients."""

  def __init__(self, cfg: config_lib.RunConfig):
    self.cfg = cfg
    self.task = load_task(cfg, needs_public=True)
    self.subset = cfg.zo.subset
    trainable, self.frozen = self.subset.split(self.task.pre.params, jax.random.key(cfg.seed))
    self.start, self.unravel = ravel_pytree(jax.tree.map(jnp.copy, trainable))
    self.d = self.start.size
    loss_fn = make_loss(self.task.model)
    frozen = self.frozen

    def loss(flat, batch):
      return loss_at(loss_fn, self.unravel(flat), frozen, batch, None, 0.0, subset=self.subset)

    self.loss = loss
    self.grad = jax.jit(jax.grad(loss))

    @jax.jit
    def private_grad(flat, batches, counts):
      """The clients' sample-weighted mean of their (one-step) batch gradients."""
      w = fedavg_weights(counts)
      def total(flat):
        per = jax.vmap(lambda b: jax.vmap(lambda s: loss(flat, s))(b).mean())(batches)
        return jnp.dot(w, per)
      return jax.grad(total)(flat)

    self.private_grad = private_grad

    @jax.jit
    def client_grads(flat, batches):
      """Each sampled client's own mean batch gradient [C, d] (what its probes measure)."""
      one = lambda b: jax.grad(lambda f: jax.vmap(lambda s: loss(f, s))(b).mean())(flat)
      return jax.lax.map(one, batches)

    self.client_grads = client_grads

    @jax.jit
    def per_example(flat, batch):
      one = lambda ex: jax.grad(loss)(flat, jax.tree.map(lambda x: x[None], ex))
      return jax.lax.map(one, batch, batch_size=_CHUNK)

    self.per_example = per_example

  def params(self, flat):
    return self.subset.materialize(self.frozen, self.unravel(flat))

  def evaluate(self, flat, split: str) -> dict:
    idx = getattr(self.task.partition, split)
    return evaluate(self.task.model, self.params(flat), self.task.arrays, self.task.labels, idx,
                    batch_size=self.cfg.eval_batch_size)

  def public_batches(self, round_index: int) -> dict:
    c = self.cfg.cloud
    return client_data.public_batches(self.task.public, c.batches, c.batch_size, self.cfg.seed,
                                      round_index)

  def public_grad(self, flat, round_index: int):
    """The mean public gradient over the round's cloud batches (CooperLLM's pool entry)."""
    batches = self.public_batches(round_index)
    return jnp.mean(jax.vmap(lambda b: self.grad(flat, b))(batches), axis=0)

  def train_cloud(self, cache: pathlib.Path) -> dict:
    """cloud_only's training, cached: the final model, its per-round public gradients and
    updates (the last 64), and AdamW's second moment."""
    if cache.exists():
      return dict(np.load(cache))
    cfg = self.cfg
    step = make_cloud_step(make_loss(self.task.model), self.subset,
                           CloudConfig('finetune', cfg.learning_rate, cfg.weight_decay))
    trainable = self.unravel(self.start)
    opt = step.init(trainable)
    grads, updates = [], []
    for r in range(1, cfg.rounds + 1):
      before, _ = ravel_pytree(trainable)
      grads.append(np.asarray(self.public_grad(before, r)))
      opt, trainable = step.train(opt, trainable, self.frozen, self.public_batches(r))
      after, _ = ravel_pytree(trainable)
      updates.append(np.asarray(after - before))
    nu = [s.nu for s in jax.tree.leaves(opt, is_leaf=lambda s: hasattr(s, 'nu'))
          if hasattr(s, 'nu')]
    out = {'theta': np.asarray(ravel_pytree(trainable)[0]),
           'grads': np.stack(grads[-64:]), 'updates': np.stack(updates[-64:]),
           'nu': np.asarray(ravel_pytree(nu[0])[0])}
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(cache, out)
    return out

  def private_sample(self) -> dict:
    """_PRIVATE_EXAMPLES examples of the clients' training data (seeded), for the distance."""
    pool = np.concatenate(self.task.partition.clients)
    rng = np.random.default_rng([self.cfg.seed, 0x0AC1E])
    idx = np.sort(rng.choice(pool, min(_PRIVATE_EXAMPLES, len(pool)), replace=False))
    return {'input_ids': self.task.arrays['input_ids'][idx],
            'attention_mask': self.task.arrays['attention_mask'][idx],
            'labels': self.task.labels[idx].astype(np.int32)}

  def logits(self, flat, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, C], labels [n]) of a split at `flat`."""
    idx = getattr(self.task.partition, split)
    params, model = self.params(flat), self.task.model
    fn = jax.jit(lambda b: model.logits(params, b))
    out = [np.asarray(fn({k: self.task.arrays[k][idx[i:i + 128]]
                          for k in ('input_ids', 'attention_mask')}))
           for i in range(0, len(idx), 128)]
    return np.concatenate(out).astype(np.float64), self.task.labels[idx]

  def recalibrated(self, flat) -> dict:
    """The control 'cloud_only with its head bias refit on the validation split': a bias
    offset b [C] minimizing the validation cross-entropy of logits + b (Newton's method, convex),
    then the test accuracy of logits + b. A recalibration, not private learning."""
    val, val_y = self.logits(flat, 'validation')
    test, test_y = self.logits(flat, 'test')
    b = fit_bias(val, val_y)
    return {'bias_offset': b.tolist(),
            'val_accuracy': float(((val + b).argmax(1) == val_y).mean()),
            'test_accuracy': float(((test + b).argmax(1) == test_y).mean()),
            'test_accuracy_before': float((test.argmax(1) == test_y).mean())}

  def features(self, flat, batch) -> np.ndarray:
    """The pooled features the classifier reads, [n, hidden] (encoders only)."""
    model = self.task.model
    if not hasattr(model, 'pool'):
      raise ConfigError('the head candidate needs an encoder (pooled features)')
    params = self.params(flat)
    @jax.jit
    def feats(b):
      return model.pool(params['head'], model.hidden(params, b), b['attention_mask'])
    return np.concatenate([np.asarray(feats({k: v[i:i + 64] for k, v in batch.items()}))
                           for i in range(0, len(batch['labels']), 64)])


# ---- subspaces ------------------------------------------------------------------------------------

def orthonormal(columns: np.ndarray) -> np.ndarray:
  """An orthonormal basis [d, k] of the span of `columns` [d, k] (QR; dependent columns dropped)."""
  q, r = np.linalg.qr(columns.astype(np.float64))
  keep = np.abs(np.diag(r)) > 1e-6 * max(np.abs(np.diag(r)).max(), 1e-30)
  return q[:, keep].astype(np.float32)


def principal(rows: np.ndarray, k: int, skip: int = 0) -> np.ndarray:
  """Right singular vectors skip .. skip + k of rows [n, d] (uncentered), as columns [d, k]."""
  gram = rows.astype(np.float64) @ rows.T.astype(np.float64)
  vals, vecs = np.linalg.eigh(gram)
  order = np.argsort(vals)[::-1][skip:skip + k]
  vals, vecs = np.maximum(vals[order], 1e-30), vecs[:, order]
  return ((rows.T.astype(np.float64) @ vecs) / np.sqrt(vals)).astype(np.float32)


def head_block(study: Study, theta: np.ndarray, public: dict, m: int) -> np.ndarray:
  """Biases of the classes, then outer(feature PC j, class c) for j = 1, 2, ..., cut at m."""
  feats = study.features(jnp.asarray(theta), public)
  pcs = principal(feats, min(feats.shape), 0)   # [hidden, r]
  zeros = jax.tree.map(np.zeros_like, study.unravel(jnp.zeros(study.d)))
  classifier = zeros['head']['classifier']
  num_classes = classifier['bias'].shape[-1]
  cols = []
  def direction(kernel=None, bias=None):
    tree = jax.tree.map(np.zeros_like, zeros)
    if kernel is not None:
      tree['head']['classifier']['kernel'] = kernel
    if bias is not None:
      tree['head']['classifier']['bias'] = bias
    return np.asarray(ravel_pytree(tree)[0])
  for c in range(num_classes):
    cols.append(direction(bias=np.eye(num_classes, dtype=np.float32)[c]))
  for j in range(pcs.shape[1]):
    for c in range(num_classes):
      if len(cols) >= m:
        break
      kernel = np.outer(pcs[:, j], np.eye(num_classes, dtype=np.float32)[c])
      cols.append(direction(kernel=kernel.astype(np.float32)))
  return orthonormal(np.stack(cols[:m], axis=1))


def build(candidate: str, m: int, study: Study, cloud: dict, public_g: np.ndarray,
          seed: int, private_g: np.ndarray, full_steps=lambda: None) -> Optional[np.ndarray]:
  """The candidate's V [d, m] at the start (None for 'full'; 'pool' is its starting pool);
  full_steps() gives full's steps [rounds, d] (computed only for 'full_path')."""
  if candidate == 'full':
    return None
  if candidate == 'private_pca':
    return orthonormal(principal(private_g, m))
  if candidate == 'full_path':
    return orthonormal(principal(full_steps(), m))
  if candidate == 'pool':
    return orthonormal(cloud['grads'][-m:].T)
  if candidate == 'history':
    return orthonormal(cloud['updates'][-m:].T)
  if candidate == 'pca':
    return orthonormal(principal(public_g, m))
  if candidate == 'pca_drop2':
    return orthonormal(principal(public_g, m, skip=2))
  if candidate == 'pca_adam':
    scale = 1.0 / (np.sqrt(cloud['nu']) + 1e-8)
    return orthonormal(principal(public_g * np.sqrt(scale), m) * np.sqrt(scale)[:, None])
  if candidate == 'head':
    return head_block(study, cloud['theta'], study.task.public, m)
  if candidate == 'random':
    rng = np.random.default_rng([seed, m, 0x5EED])
    return orthonormal(rng.standard_normal((study.d, m)).astype(np.float32))
  raise ConfigError(f'unknown candidate {candidate!r}; choose from {", ".join(CANDIDATES)}')


def distance(v: Optional[np.ndarray], private_top: np.ndarray) -> float:
  """sqrt(1 - |V^T U|_F^2 / m): 0 when V spans the private top-m subspace, 1 when orthogonal."""
  if v is None:
    return 0.0
  overlap = np.sum((v.T @ private_top[:, :v.shape[1]]) ** 2)
  return float(math.sqrt(max(0.0, 1.0 - overlap / v.shape[1])))


def captured(v: Optional[np.ndarray], g: np.ndarray) -> float:
  return 1.0 if v is None else float(np.sum((v.T @ g) ** 2) / np.sum(g ** 2))


# ---- the oracle run -------------------------------------------------------------------------------

ESTIMATES = ('exact', 'gaussian', 'coordinates')


def probe_estimate(estimate: str, hs: np.ndarray, weights: np.ndarray, clients: np.ndarray,
                   round_index: int, seed: int, probes: int = 1) -> np.ndarray:
  """The edge's estimate of sum_i w_i hs[i] [m] when client i reports only hs[i] . u_ip for its
  `probes` directions u_ip (the module docstring); u is a function of (seed, round, client id,
  probe), as the probe keys are. P probes of a client count as P clients of weight w_i / P."""
  if probes > 1:
    return probe_estimate(estimate, np.repeat(hs, probes, axis=0),
                          np.repeat(weights, probes) / probes,
                          np.asarray(clients, np.int64)[:, None] * probes + np.arange(probes),
                          round_index, seed)
  clients = np.ravel(clients)
  c, m = hs.shape
  if estimate == 'gaussian':
    u = np.stack([np.random.default_rng([seed, round_index, int(k), 0x9B0BE]).standard_normal(m)
                  for k in clients])
    return ((weights * np.sum(hs * u, axis=1))[:, None] * u).sum(axis=0)
  if estimate == 'coordinates':
    j = (round_index * c + np.arange(c)) % m
    total, mass = np.zeros(m), np.zeros(m)
    np.add.at(total, j, weights * hs[np.arange(c), j])
    np.add.at(mass, j, weights)
    return np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), 0.0)
  raise ConfigError(f'unknown estimate {estimate!r}; choose from {", ".join(ESTIMATES)}')


def oracle_run(study: Study, theta0: np.ndarray, v0: Optional[np.ndarray], rule: str, lr: float,
               pool: Optional[np.ndarray], steps: Optional[list] = None,
               estimate: str = 'exact', probes: int = 1) -> dict:
  """The edge's rounds with the private gradient projected on V (pool: refreshed), exact or as
  the clients' probes estimate it; each round's step [d] is appended to `steps` if given."""
  cfg = study.cfg
  theta = jnp.asarray(theta0)
  v = None if v0 is None else jnp.asarray(v0)
  adam = optax.adam(lr)
  coords = theta if v is None else jnp.zeros(v.shape[1])
  opt = adam.init(coords)
  history = None if pool is None else list(pool)
  for r in range(1, cfg.rounds + 1):
    if history is not None:   # CooperLLM's pool: push the public gradient at the current model
      history = history[1:] + [np.asarray(study.public_grad(theta, r))]
      v = jnp.asarray(orthonormal(np.stack(history, axis=1)))
    sampled, batches, counts = study.task.round_inputs(cfg, r)
    batches = jax.tree.map(jnp.asarray, batches)
    if estimate == 'exact':
      g = study.private_grad(theta, batches, jnp.asarray(counts))
      h = g if v is None else v.T @ g
    else:
      hs = np.asarray(study.client_grads(theta, batches) @ v, np.float64)
      h = jnp.asarray(probe_estimate(estimate, hs, np.asarray(fedavg_weights(counts)), sampled,
                                     r, cfg.seed, probes), jnp.float32)
    if rule == 'sgd':
      step = lr * h
    else:
      step, opt = adam.update(h, opt)
      step = -step
    step = step if v is None else v @ step
    if steps is not None:
      steps.append(np.asarray(step))
    theta = theta - step
    if not bool(jnp.isfinite(theta).all()):
      return {'diverged': True, 'round': r}
  val, test = study.evaluate(theta, 'validation'), study.evaluate(theta, 'test')
  return {'diverged': False, 'val_accuracy': val['accuracy'], 'val_loss': val['loss'],
          'test_accuracy': test['accuracy'], 'test_loss': test['loss']}


def study_one(setting: str, seed: int, candidates, ms, rule: str, lrs, out: pathlib.Path,
              cache: pathlib.Path, bench: pathlib.Path, estimates=('exact',),
              probes: int = 1) -> None:
  cfg = run_config(setting, seed, bench)
  study = Study(cfg)
  t0 = time.time()
  cloud = study.train_cloud(cache / setting / f'seed={seed}.npz')
  theta = cloud['theta']
  root = out / setting / f'seed={seed}'
  start_path = root / 'start.json'
  if not start_path.exists():   # the start model, its predictors' inputs
    val, test = study.evaluate(jnp.asarray(theta), 'validation'), study.evaluate(
        jnp.asarray(theta), 'test')
    write_text_atomic(start_path, json.dumps({
        'setting': setting, 'seed': seed, 'd': int(study.d), 'rounds': cfg.rounds,
        'cloud_only_lr': cfg.learning_rate, 'val_accuracy': val['accuracy'],
        'val_loss': val['loss'], 'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
        'fedavg_bp_test_accuracy': fedavg_bp_accuracy(setting, seed, bench),
        'cloud_seconds': time.time() - t0}, indent=1))
  print(f'{setting} seed {seed}: start {json.loads(start_path.read_text())}', flush=True)
  recalibrated_path = root / 'recalibrated.json'
  if not recalibrated_path.exists():
    write_text_atomic(recalibrated_path, json.dumps(study.recalibrated(jnp.asarray(theta)),
                                                    indent=1))
  theta_j = jnp.asarray(theta)
  per_example = cache / setting / f'seed={seed}_per_example.npz'   # the start's, [n, d] each
  if not per_example.exists():
    save_npz_atomic(per_example, {
        name: np.asarray(study.per_example(theta_j, jax.tree.map(jnp.asarray, batch)))
        for name, batch in (('public', study.task.public), ('private', study.private_sample()))})
  with np.load(per_example) as grads:
    public_g, private_g = grads['public'], grads['private']
  private_top = principal(private_g, max(ms))
  private_mean = private_g.mean(axis=0)

  def full_steps() -> np.ndarray:
    """full's steps at its picked rate (rerun once with the steps recorded, then cached)."""
    runs = [json.loads(p.read_text()) for p in root.glob(f'full_m0_{rule}_lr*.json')]
    runs = [r for r in runs if not r['diverged']]
    if not runs:
      raise ConfigError(f'full_path needs full\'s runs with rule {rule} first '
                        f'(--candidates=full)')
    lr = max(runs, key=lambda r: (r['val_accuracy'], -r['lr']))['lr']
    path = cache / setting / f'seed={seed}_full_steps_{rule}_lr{lr:g}.npz'
    if not path.exists():
      steps = []
      oracle_run(study, theta, None, rule, lr, None, steps)
      path.parent.mkdir(parents=True, exist_ok=True)
      save_npz_atomic(path, {'steps': np.stack(steps)})
    return np.load(path)['steps']

  for candidate in candidates:
    for m in (ms if candidate != 'full' else (0,)):
      v = build(candidate, m, study, cloud, public_g, seed, private_g, full_steps)
      pool = cloud['grads'][-m:] if candidate == 'pool' else None
      for estimate, lr in itertools.product(estimates if v is not None else ('exact',), lrs):
        suffix = ('' if estimate == 'exact' else f'_{estimate}'
                  + (f'_p{probes}' if probes > 1 else ''))
        path = root / f'{candidate}_m{m}_{rule}_lr{lr:g}{suffix}.json'
        if path.exists():
          continue
        t = time.time()
        result = oracle_run(study, theta, v, rule, lr, pool, estimate=estimate, probes=probes)
        result.update(candidate=candidate, m=m if v is not None else int(study.d),
                      basis_rank=int(v.shape[1]) if v is not None else int(study.d),
                      rule=rule, estimate=estimate, probes=probes if estimate != 'exact' else 0,
                      lr=lr, distance=distance(v, private_top),
                      captured=captured(v, private_mean), seconds=time.time() - t)
        write_text_atomic(path, json.dumps(result, indent=1))
        print(f'{path.name}: {result}', flush=True)


# ---- the table ------------------------------------------------------------------------------------

def report(out: pathlib.Path) -> str:
  """oracle.md / oracle.json: per setting and seed, each (candidate, m)'s pick by validation.

  Two headrooms: the cloud_only -> fedavg_bp test gap (the protocol's gate), and the gain of
  `full` (V = I, the same rounds from the same start): the latter exists where fedavg_bp, which
  starts from the pretrained model, ends below the cloud (20 Newsgroups)."""
  lines, table = ['# Oracle study: the exact private gradient projected on a cloud-built V', ''], []
  for start_path in sorted(out.glob('*/seed=*/start.json')):
    start = json.loads(start_path.read_text())
    runs = [json.loads(p.read_text()) for p in start_path.parent.glob('*_lr*.json')]
    base, top = start['test_accuracy'], start['fedavg_bp_test_accuracy']
    recal_path = start_path.parent / 'recalibrated.json'
    recal = json.loads(recal_path.read_text()) if recal_path.exists() else None
    recal_text = 'not run' if recal is None else f'test {recal["test_accuracy"]:.4f}'
    lines += [f'## {start["setting"]}, seed {start["seed"]} (d = {start["d"]}, '
              f'{start["rounds"]} rounds)', '',
              f'cloud_only (start): test {base:.4f}, validation {start["val_accuracy"]:.4f}; '
              f'fedavg_bp test: {"not run" if top is None else f"{top:.4f}"}; cloud_only with '
              f'its head bias refit on validation: {recal_text}', '',
              '| V | m | rule | h | picked lr | val acc | test acc | gap closed | of full\'s gain '
              '| val loss | distance | captured | grid edge |', '| --- ' * 13 + '|']
    groups = {}
    for r in runs:   # runs from before the probe estimates are exact
      estimate = r.get('estimate', 'exact')
      if estimate != 'exact':
        estimate += f' x{r.get("probes", 1)}'   # probes per client and round
      groups.setdefault((r['candidate'], r['m'], r['rule'], estimate), []).append(r)
    picks = {key: max((r for r in rs if not r['diverged']),
                      key=lambda r: (r['val_accuracy'], -r['lr']), default=None)
             for key, rs in groups.items()}
    for (candidate, m, rule, estimate), rs in sorted(groups.items(), key=lambda kv: (
        CANDIDATES.index(kv[0][0]) if kv[0][0] in CANDIDATES else 99, kv[0][1], kv[0][2],
        ESTIMATES.index(kv[0][3].split()[0]), int(kv[0][3].split(' x')[-1] if ' x' in kv[0][3]
                                                 else 0))):
      best = picks[(candidate, m, rule, estimate)]
      if best is None:
        continue
      lrs = sorted(r['lr'] for r in rs)
      gap = None if top is None or top == base else (best['test_accuracy'] - base) / (top - base)
      full = [b for (c, _, r, _), b in picks.items() if c == 'full' and r == rule and b is not None]
      share = (None if not full or full[0]['test_accuracy'] == base
               else (best['test_accuracy'] - base) / (full[0]['test_accuracy'] - base))
      row = dict(setting=start['setting'], seed=start['seed'], candidate=candidate, m=m,
                 rule=rule, estimate=estimate, lr=best['lr'], val_accuracy=best['val_accuracy'],
                 test_accuracy=best['test_accuracy'], gap_closed=gap, share_of_full=share,
                 val_loss=best['val_loss'], distance=best['distance'],
                 captured=best['captured'], grid_edge=best['lr'] in (lrs[0], lrs[-1]),
                 rates_tried=len(rs), start_test_accuracy=base, fedavg_bp_test_accuracy=top)
      table.append(row)
      lines.append(f'| {candidate} | {m} | {rule} | {estimate} | {best["lr"]:g} | '
                   f'{best["val_accuracy"]:.4f} | {best["test_accuracy"]:.4f} | '
                   f'{"" if gap is None else f"{gap:+.2f}"} | '
                   f'{"" if share is None else f"{share:+.2f}"} | {best["val_loss"]:.4f} | '
                   f'{best["distance"]:.3f} | {best["captured"]:.3f} | '
                   f'{"yes" if row["grid_edge"] else ""} |')
    lines.append('')
  write_text_atomic(out / 'oracle.json', json.dumps(table, indent=1))
  text = '\n'.join(lines)
  write_text_atomic(out / 'oracle.md', text)
  return text


def define_flags() -> None:
  """The command line (defined when run as a script, so importing the module defines none)."""
  flags.DEFINE_list('settings', ['rt_shifted_minilm_lora'], 'Benchmark settings.')
  flags.DEFINE_list('seeds', ['0'], 'Seeds (the cloud_only run and the clients).')
  flags.DEFINE_list('candidates', list(CANDIDATES), 'V constructions.')
  flags.DEFINE_list('ms', ['4', '8', '16', '32', '64'], 'Subspace dimensions m.')
  flags.DEFINE_enum('rule', 'adam', list(GRIDS), 'The edge\'s step rule.')
  flags.DEFINE_list('estimates', ['exact'], 'How the edge gets h = V^T g: exact, or the '
                    'clients\' probes (gaussian, coordinates).')
  flags.DEFINE_integer('probes', 1, 'Probes per client and round of the estimates.')
  flags.DEFINE_list('lrs', [], 'Rates to try (default: the rule\'s grid).')
  flags.DEFINE_enum('stage', 'all', ['all', 'runs', 'report'], 'Runs, the table, or both.')
  flags.DEFINE_string('out', 'experiments/results/oracle_subspace', 'Result JSON files.')
  flags.DEFINE_string('cache', 'workdir/oracle_cache', 'Cached cloud training (npz).')
  flags.DEFINE_string('benchmark', 'experiments/results/benchmark',
                      'The benchmark\'s results (sweep picks, fedavg_bp\'s accuracy).')


def main(argv):
  del argv
  f = flags.FLAGS
  out, cache, bench = pathlib.Path(f.out), pathlib.Path(f.cache), pathlib.Path(
      f.benchmark)
  problems = [f'unknown candidate {c!r}; choose from {", ".join(CANDIDATES)}'
              for c in f.candidates if c not in CANDIDATES]
  problems += [f'unknown setting {s!r}; choose from {", ".join(SETTINGS)}'
               for s in f.settings if s not in SETTINGS]
  problems += [f'--ms takes positive integers, got {m!r}' for m in f.ms
               if not (m.isdigit() and int(m) > 0)]
  problems += [f'unknown estimate {e!r}; choose from {", ".join(ESTIMATES)}'
               for e in f.estimates if e not in ESTIMATES]
  if f.probes < 1:
    problems.append(f'--probes takes a positive integer, got {f.probes}')
  if problems:
    print(f'error: {problems[0]}', file=sys.stderr)
    sys.exit(2)
  if f.stage in ('all', 'runs'):
    lrs = [float(x) for x in f.lrs] or GRIDS[f.rule]
    for setting in f.settings:
      for seed in f.seeds:
        study_one(setting, int(seed), f.candidates, [int(m) for m in f.ms],
                  f.rule, lrs, out, cache, bench, f.estimates, f.probes)
  if f.stage in ('all', 'report'):
    print(report(out))


if __name__ == '__main__':
  define_flags()
  app.run(main)
