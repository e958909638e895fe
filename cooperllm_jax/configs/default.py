"""The packaged default run: all-MiniLM-L6-v2 fine-tuned on BBC News over 10 non-IID clients with
CooperLLM (the classifier head is what ZO trains by default, see zo.trainable).

Sized to finish in a few minutes on 2 CPU cores. It is `cooperllm-train`'s default --config, so the
console script runs from any directory; experiments/configs/demo.py (the checkout's name for it)
re-exports it. `get_config('fedavg_bp')` (on the command line: --config=<this file>:fedavg_bp)
gives any registered algorithm with its tuned rate; `get_config('my_pkg.my_algo:name')` first
imports a user's module that registers `name` (docs/algorithms.md), so its config section is
there to override (--config.<section>.<field>=...).
"""

import dataclasses

import ml_collections

from cooperllm_jax import config as config_lib

# Learning rates tuned on this task (BBC News, MiniLM): ZO-SGD takes much smaller steps than AdamW.
# cloud_only's is its AdamW rate; warm_start's the rate of its ZO rounds (its cloud rounds take
# cloud.learning_rate).
LEARNING_RATES = {'cooperllm': 1e-2, 'fedmezo': 5e-2, 'fedkseed': 5e-2, 'decomfl': 5e-2, 'fwdllm': 5e-2,
                  'fedavg_bp': 5e-5, 'cloud_only': 1e-3, 'warm_start': 5e-2}
# Each algorithm's other departures from the shared defaults (flattened keys).
TUNED = {'cooperllm': {'rounds': 20},            # it converges in ~10 rounds (the others: 40)
         'fwdllm': {'zo.probes': 4},             # fwdllm's maximum probes per step
         'fedavg_bp': {'zo.trainable': 'full'}}  # the first-order bound fine-tunes every weight


def get_config(algorithm: str = 'cooperllm') -> ml_collections.ConfigDict:
  """The default run of `algorithm` ('name', or 'module:name' for an algorithm in a user's module):
  every field a run reads, so any of them can be overridden."""
  module, _, algorithm = algorithm.rpartition(':')
  config_lib.load_modules(module)
  c = ml_collections.ConfigDict()
  c.algorithm = algorithm
  c.algorithm_module = module   # imported before the algorithm is looked up (replay reads it too)
  c.model = 'minilm'            # embedded name, a HF model directory, or a .gguf file
  c.dataset = 'bbcnews'         # a name in docs/datasets.md or a local CSV/JSON/Parquet file
  c.text_column = 'text'        # a local file's columns of texts and of labels
  c.label_column = 'label'
  c.label_names = ()            # a local file's class names in label id order (() = from the file)
  c.label_words = ()            # decoders: one word per class (default: the dataset's label names)
  c.prompt_suffix = '\nTopic:'  # decoders: the cue after which label words are scored
  c.pooling = 'mean'
  c.dtype = 'float32'
  c.param_dtype = 'float32'
  c.max_length = 32             # the title and the start of the lead: enough for the topic
  c.num_clients = 10
  c.partition = 'dirichlet'
  c.dirichlet_alpha = 0.5
  c.min_client_size = 16
  c.test_fraction = 0.2
  c.public_fraction = 0.05
  c.validation_fraction = 0.0   # held out of the clients' data for tuning (val_accuracy)
  c.seed = 0
  c.rounds = 40
  c.clients_per_round = 4
  c.local_steps = 8
  c.batch_size = 8
  c.learning_rate = LEARNING_RATES.get(algorithm, 1e-3)
  c.weight_decay = 0.0          # fedavg_bp's AdamW
  c.client_chunk = 1            # clients vmapped together inside the round's lax.map
  c.client_backend = 'map'      # 'loop': one jitted call per client, for debugging
  # One device mesh for the run (docs/scaling.md): clients split over 'clients', the cloud's BP
  # over 'data' x 'model'. 1 x 1 x 1 = one device, no mesh; clients or data = -1: all the rest.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.clients = 1            # must divide clients_per_round
  c.mesh.data = 1
  c.mesh.model = 1
  c.eval_every = 5
  c.eval_batch_size = 64
  c.tensorboard = True
  c.zo = ml_collections.ConfigDict()
  c.zo.eps = 1e-3
  c.zo.probes = 1
  c.zo.scheme = 'central'       # or 'one_sided'
  c.zo.distribution = 'rademacher_hash'  # or 'gaussian' (threefry), 'gaussian_hash', 'rademacher'
  c.zo.clip = ml_collections.config_dict.placeholder(float)  # |g| bound; None = off
  c.zo.trainable = 'head'       # full | bitfit | head | lora: what every algorithm trains
  c.zo.lora_rank = 8
  c.zo.lora_alpha = 16.0
  c.zo.lora_targets = ('attn/q', 'attn/v')
  c.zo.perturb_impl = 'xla'     # or 'pallas': the fused Pallas kernel perturbs 2-D weights
  c.zo.base_weights = 'f32'     # frozen weights kept on the client as 'int8' or 'int4' (packed)
  c.zo.base_group = 32          # columns per quantization scale of the frozen weights
  c.fedkseed = ml_collections.ConfigDict()
  c.fedkseed.candidates = 4096  # K: the seeds fixed for the run
  c.fwdllm = ml_collections.ConfigDict()
  c.fwdllm.candidates = 4       # directions drawn per probe slot, the best cosine kept
  c.fwdllm.min_probes = 2       # probes per step run between min_probes and zo.probes (the max)
  c.fwdllm.var_threshold = 0.5
  # ZGR (cooperllm): guided probes z = beta (sqrt(alpha) v + probe_v sqrt(1-alpha) V u), steps
  # along V at the first-order rate lr_v (zoo/guided.py).
  c.zgr = ml_collections.ConfigDict()
  c.zgr.alpha = 0.5             # share of the random part; 1 = plain ZO (FedMeZO)
  c.zgr.adaptive = False        # the V step's weight from the edge's estimates
  c.zgr.ema = 0.8               # forgetting factor of the adaptive estimates' pooling
  c.zgr.pool_size = 1           # m: the last m cloud directions span V
  c.zgr.refresh = 1             # the cloud computes a new direction every `refresh` rounds
  c.zgr.beta = 1.0              # scale of z's plain part (1 with alpha = 1: plain ZO)
  c.zgr.probe_v = 1.0           # the probe's radius along V relative to the plain part's
  c.zgr.lr_v = 0.1              # first-order rate of the step along V (free of d; the largest)
  c.zgr.curvature_cap = 0.0     # > 0: V rate <= this / the cloud's measured curvature along V
  c.zgr.trace_cap = 0.0         # > 0: plain rate <= this / the cloud's Hutchinson tr H
  c.zgr.trace_probes = 4        # Hessian-vector products of that estimate per refresh
  c.zgr.line_search = 12        # > 0: both rates follow the cloud's line search (this many halvings)
  # V on the downlink: f32 | int8 | int4 | ternary, or per-leaf formats under a byte budget:
  # adaptive (guidance_budget_bytes) | link (what the simulated links hide behind compute: system.*)
  c.zgr.guidance_format = 'f32'
  c.zgr.guidance_block = 256    # values per codec scale
  c.zgr.guidance_budget_bytes = 0  # adaptive: bytes of V per client and round (> 0)
  c.zgr.guidance_topk = ml_collections.config_dict.placeholder(float)  # keep this share; None = all
  c.cloud = ml_collections.ConfigDict()
  c.cloud.mode = 'gradient'     # or 'finetune': k AdamW steps of the cloud's own, send the update
  c.cloud.learning_rate = 1e-3  # finetune mode's AdamW rate
  c.cloud.weight_decay = 0.0
  c.cloud.batches = 2           # k public batches per refresh
  c.cloud.batch_size = 32
  c.cloud.lag = 0               # 1: round r's guidance from round r-1's model (overlaps the tiers)
  c.cloud.devices = 0           # > 0: the cloud runs on the last n devices, clients on device 0
  c.cloud.public_examples = 0   # cap on the public slice the cloud uses (0 = all of it)
  c.cloud.public_classes = ()   # keep only these labels (domain mismatch); () = all
  c.cloud.shuffle_labels = False  # control: permuted public labels (a cloud without signal)
  c.cloud.public_dataset = ''   # public set from other datasets ('a+b'); needs public_fraction=0
  # warm_start: cloud_only for the first warm.rounds rounds, then warm.then on the clients.
  c.warm = ml_collections.ConfigDict()
  c.warm.rounds = 10
  c.warm.then = 'fedmezo'
  c.warm.cloud_rounds = 0   # cloud_only rounds of compute the warm rounds spend (0: one a round)
  # The simulated system (cooperllm_jax/system): device profiles of the tiers and the SPC schedule,
  # which give every round a simulated wall-clock latency (metrics: sim_round_s, sim_time_s).
  c.system = ml_collections.ConfigDict()
  c.system.profiles = ''        # device-profile JSON; '' = cooperllm_jax/system/profiles.json
  c.system.cloud = 'cloud_gpu'
  c.system.edge = 'edge_server'
  c.system.clients = 'phone_midrange'  # one end-device profile, or a mix 'name:share,name:share'
  c.system.pipelined = True     # SPC's layer-wise pipelining; False: each tier waits for the last
  # Reliability: checkpoints and the ledger (cooperllm_jax/checkpoint.py, federated/ledger.py).
  c.checkpoint_every = 10       # orbax checkpoint every N rounds and at the last; 0 = off
  c.keep_checkpoints = 3        # the newest N are kept
  c.ledger = True               # workdir/ledger: each round's received uplinks (experiments.replay)
  # The edge's aggregation (zo.Aggregation): mean (FedAvg) | clip | trimmed_mean | median.
  c.aggregation = 'mean'
  c.aggregation_trim = 0.2      # trimmed_mean: share of the clients cut at each end, in [0, 0.5]
  c.aggregation_clip = 1.0      # clip: a client's scalar norm is capped at this x the median's
  # Simulated faults (federated/faults.py), all deterministic from (seed, round, client).
  c.faults = ml_collections.ConfigDict()
  c.faults.dropout = 0.0        # probability that a sampled client sends nothing this round
  c.faults.deadline = 0.0       # uploads later than this x the nominal latency dropped; 0 = none
  c.faults.latency_sigma = 0.5  # log-normal spread of client speed and of per-round jitter
  c.faults.byzantine = 0.0      # share of the clients (ids fixed by the seed) that corrupt scalars
  c.faults.byzantine_scale = -10.0  # what they multiply their scalars by (-1: sign flip)
  c.faults.nonfinite = 0.0      # probability that a sent scalar arrives as NaN/Inf (edge rejects)
  # Optional DP of the uplink scalars (federated/privacy.py): per-client clipping + Gaussian noise.
  c.dp = ml_collections.ConfigDict()
  c.dp.clip = 0.0               # L2 bound on a client's scalars per round; 0 = DP off
  c.dp.noise = 1.0              # noise multiplier: N(0, (noise * clip)^2) on every sent scalar
  c.dp.delta = 1e-5             # epsilon is reported at this delta (metrics: dp_epsilon)
  # Divergence guard (faults.DivergenceGuard): on a loss spike, roll back and halve the rate.
  c.guard = ml_collections.ConfigDict()
  c.guard.spike = 4.0           # spike: train loss > spike x the running median; 0 = off
  c.guard.window = 5            # losses in the running median (the guard starts once it is full)
  c.guard.max_rollbacks = 5     # then give up with an error
  # The sections of algorithms registered from outside the package, at their defaults.
  for name, section in config_lib.algorithm_sections().items():
    if name not in c:
      c[name] = ml_collections.ConfigDict(dataclasses.asdict(section()))
  c.update_from_flattened_dict(TUNED.get(algorithm, {}))
  return c
