"""The benchmark's settings, methods, learning-rate grids and seeds, and the Plan a setting runs
as (experiments/benchmark.py runs them; no flags are defined here, so other tools can import it)."""

import dataclasses
from typing import Optional

from cooperllm_jax.errors import ConfigError

# The main setting's data: Rotten Tomatoes reviews on 200 clients (Dirichlet label skew, 20 a
# round, FedSGD), the cloud holding 256 sentiment snippets of other domains (VADER's Amazon
# reviews and tweets). max_length 32 holds 70% of the review snippets whole (median 27 tokens).
# Test 10% (1,281 reviews) and validation 5% (640): an evaluation costs as much as 50 client steps.
_RT = ('dataset=rotten_tomatoes', 'max_length=32', 'num_clients=200', 'clients_per_round=20',
       'partition=dirichlet', 'dirichlet_alpha=1.0', 'min_client_size=4', 'test_fraction=0.1',
       'validation_fraction=0.05', 'batch_size=8', 'eval_batch_size=128',
       'cloud.public_examples=256', 'checkpoint_every=10', 'ledger=False', 'tensorboard=False',
       'zo.distribution=gaussian')
_FEDSGD = ('local_steps=1',)   # the main protocol: one local step a round
_SHIFTED = ('public_fraction=0', 'cloud.public_dataset=vader_amazon+vader_tweets')
_IN_DOMAIN = ('public_fraction=0.02',)   # 256 of the reviews themselves
_LORA = ('zo.trainable=lora',)


def _bbc(trainable: str) -> tuple:
  """The embedded default's task (demo.py) with 10% of the clients' data for validation."""
  return ('validation_fraction=0.1', f'zo.trainable={trainable}', 'zo.distribution=gaussian',
          'ledger=False', 'tensorboard=False')

# Learning-rate grids (5 values, half a decade apart) by method family: the ZO rate moves the
# scalar-weighted directions, the BP rate is AdamW's. A setting may replace them (full
# fine-tuning's ZO rate is orders smaller: the step grows with the trained dimension). The ZO
# grid was 1e-4..1e-2 until FedMeZO picked 1e-2, its edge, on rt_shifted_minilm_lora; it was
# widened upwards (the runs at 1e-4 and 3e-4 stay in the results, outside the grid). lr_V's grid
# was 0.1..10, then 0.01..1 (1, 3 and 10 diverged; the lower edge was picked twice); with the
# plain step at FedMeZO's full rate (zoo/guided.py) the two steps add up, so it moved down again.
# With the cloud's line search (cooperllm's default) lr_V is the largest rate the search starts
# from, so its grid ('lr_v_max') is centred on the default 0.1 and reaches well above it.
GRIDS = {'zo': (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), 'bp': (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
         'lr_v': (0.003, 0.01, 0.03, 0.1, 0.3), 'lr_v_max': (0.03, 0.1, 0.3, 1.0, 3.0),
         # ZO after the cloud's phase: a trained model takes smaller steps than a pretrained one
         # (on 20 Newsgroups FedMeZO's picked 3e-2 blows a cloud-trained model's loss up to 13-60).
         'zo_after_cloud': (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}
SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class Method:
  """How a method is run and tuned: `knob` (a config key) is swept over the grid `family`;
  `needs` takes other config keys from other methods' picks; an ablation (`rate_of`) is not swept
  but runs at that method's pick."""
  algorithm: str                # registered name
  overrides: tuple = ()
  family: str = 'zo'
  knob: str = 'learning_rate'
  needs: tuple = ()             # (config key, method whose pick it takes)
  rate_of: Optional[str] = None
  cloud_phase: bool = False     # warm_start: the first half of the rounds are the cloud's
  whole_cloud: bool = False     # ... and spend cloud_only's whole compute (its final model)
  ours: bool = False            # a CooperLLM variant: never the target the baselines set

  def depends_on(self) -> set:
    return {m for _, m in self.needs} | ({self.rate_of} if self.rate_of else set())


# cooperllm's plain part runs at FedMeZO's picked rate (alpha = 1 is FedMeZO); what it adds, the
# first-order step along the cloud's subspace, is tuned by its own rate lr_V (zoo/guided.py).
# cooperllm is the shipped defaults (the cloud's line search sets both rates each round, lr_V the
# largest); the variants before the line search pin it off (zgr.line_search=0, their runs' config).
COOPERLLM = ('zgr.alpha=0.5', 'zgr.adaptive=False')   # pinned: the runs keep their config
FIXED = ('zgr.line_search=0',)
LINE_ADAPTIVE = ('zgr.alpha=0.5', 'zgr.adaptive=True')
_GUIDED = dict(family='lr_v', knob='zgr.lr_v', needs=(('learning_rate', 'fedmezo'),), ours=True)
METHODS = {
    'cloud_only': Method('cloud_only', family='bp'),
    'cooperllm': Method('cooperllm', COOPERLLM, **dict(_GUIDED, family='lr_v_max')),
    # The fixed V rate (no line search): what cooperllm was until the line search.
    'cooperllm_fixed_rate': Method('cooperllm', COOPERLLM + FIXED, **_GUIDED),
    'fedmezo': Method('fedmezo'),
    # warm_start's ZO phase runs at FedMeZO's picked rate; its cloud phase (half the rounds, so
    # half cloud_only's steps) is tuned by its own AdamW rate, which for the shorter phase is
    # not cloud_only's pick.
    'warm_start': Method('warm_start', family='bp', knob='cloud.learning_rate',
                         needs=(('learning_rate', 'fedmezo'),), cloud_phase=True),
    # warm_start as the issue defines it: cloud_only's final model (the cloud phase spends
    # cloud_only's whole compute at its picked rate), then ZO for the second half of the rounds,
    # its rate swept from that model (warm_start's, FedMeZO's pick from the pretrained model, can
    # undo the cloud's phase). Its first runs spent half cloud_only's compute at cloud_only's
    # rate, a rate picked for twice the steps: on rt_shifted that model was at chance.
    'warm_start_zo_swept': Method('warm_start', family='zo_after_cloud',
                                  needs=(('cloud.learning_rate', 'cloud_only'),),
                                  cloud_phase=True, whole_cloud=True),
    # cooperllm guided by the cloud's AdamW direction instead of its raw public gradient
    # (cloud.mode=finetune: K AdamW steps from the global model at cloud_only's picked rate, the
    # optimizer state carried over rounds): the preconditioned direction cloud_only trains along.
    'cooperllm_cloud_adamw': Method('cooperllm', COOPERLLM + ('cloud.mode=finetune',),
                                    **dict(_GUIDED, family='lr_v_max',
                                           needs=(('learning_rate', 'fedmezo'),
                                                  ('cloud.learning_rate', 'cloud_only')))),
    'fedkseed': Method('fedkseed'),
    'decomfl': Method('decomfl'),
    'fwdllm': Method('fwdllm', ('zo.probes=4',)),
    'fedavg_bp': Method('fedavg_bp', family='bp'),
    # ZGR ablations at cooperllm's picks: the mixing weight, and a cloud without signal.
    # Adaptive cooperllm shrinks the V step by the measured noise (zoo/mixing.py), so its lr_V is
    # a rate at full signal and is swept on its own.
    'cooperllm_adaptive': Method('cooperllm', ('zgr.adaptive=True',) + FIXED, **_GUIDED),
    # The V rate capped at 1 / L_V, L_V the public loss's curvature along the cloud's direction
    # (measured each round): the curvature grows as the model trains, so it is swept on its own.
    'cooperllm_curvature': Method('cooperllm', COOPERLLM + FIXED + ('zgr.curvature_cap=1.0',),
                                  **_GUIDED),
    'cooperllm_alpha=0.25': Method('cooperllm', ('zgr.alpha=0.25', 'zgr.adaptive=False') + FIXED,
                                   rate_of='cooperllm_fixed_rate', **_GUIDED),
    'cooperllm_alpha=0.75': Method('cooperllm', ('zgr.alpha=0.75', 'zgr.adaptive=False') + FIXED,
                                   rate_of='cooperllm_fixed_rate', **_GUIDED),
    'cooperllm_shuffled_adaptive': Method('cooperllm', ('zgr.adaptive=True',
                                                        'cloud.shuffle_labels=True') + FIXED,
                                          rate_of='cooperllm_adaptive', **_GUIDED),
    'cooperllm_fixed_rate_shuffled': Method('cooperllm', COOPERLLM + FIXED +
                                            ('cloud.shuffle_labels=True',),
                                            rate_of='cooperllm_fixed_rate', **_GUIDED),
    'cooperllm_shuffled': Method('cooperllm', COOPERLLM + ('cloud.shuffle_labels=True',),
                                 rate_of='cooperllm', **dict(_GUIDED, family='lr_v_max')),
    # The adaptive mixing on top of the line search, at cooperllm's largest lr_V (the search,
    # not lr_V, sets the rate where the loss is sharp): with a misleading cloud and without.
    'cooperllm_line_adaptive': Method('cooperllm', LINE_ADAPTIVE, rate_of='cooperllm',
                                      **dict(_GUIDED, family='lr_v_max')),
    'cooperllm_line_adaptive_shuffled': Method('cooperllm', LINE_ADAPTIVE +
                                               ('cloud.shuffle_labels=True',),
                                               rate_of='cooperllm',
                                               **dict(_GUIDED, family='lr_v_max')),
}
MAIN_METHODS = ('cloud_only', 'cooperllm', 'cooperllm_fixed_rate', 'cooperllm_adaptive',
                'fedmezo', 'warm_start', 'warm_start_zo_swept', 'fedkseed', 'decomfl', 'fwdllm',
                'fedavg_bp')
ZGR_CHECKS = ('fedmezo', 'cooperllm', 'cooperllm_fixed_rate', 'cooperllm_adaptive',
              'cooperllm_alpha=0.25', 'cooperllm_alpha=0.75', 'cooperllm_shuffled_adaptive',
              'cooperllm_fixed_rate_shuffled', 'cooperllm_shuffled', 'cooperllm_line_adaptive',
              'cooperllm_line_adaptive_shuffled')


@dataclasses.dataclass(frozen=True)
class Setting:
  about: str
  overrides: tuple
  rounds: int
  eval_every: int
  methods: tuple = MAIN_METHODS
  grids: Optional[dict] = None  # family -> rates replacing GRIDS' (the others stay)
  # (method, control) pairs compared at finer resolution than three seeds resolve: both run
  # `paired_seeds`, and the report adds their difference paired by seed.
  paired: tuple = ()
  paired_seeds: tuple = ()


SETTINGS = {
    'rt_shifted_minilm_lora': Setting(
        'Rotten Tomatoes on 200 clients, public: 256 VADER Amazon + tweet snippets (another '
        'domain); MiniLM, LoRA (q, v; rank 8) + head', _RT + _FEDSGD + _SHIFTED + _LORA, 40, 10,
        MAIN_METHODS + ('cooperllm_cloud_adamw',),
        # cooperllm (the line search's) picked the largest lr_V 0.03, the shared grid's lower
        # edge: the grid moved down a decade (the runs at 1 and 3 stay, outside the grid).
        {'lr_v_max': (0.003, 0.01, 0.03, 0.1, 0.3)}),
    # The paper's second protocol: several local steps a round (each client's ZO steps on its own
    # batches before it reports), the decisive methods only.
    'rt_shifted_minilm_lora_local4': Setting(
        'as rt_shifted_minilm_lora with 4 local steps a round instead of FedSGD\'s one',
        # The shared lr_V grid: rt_shifted's lower one was tried first and cooperllm picked its
        # top edge, 0.3 (the runs at 0.003 and 0.01 stay, outside the grid).
        _RT + _SHIFTED + _LORA + ('local_steps=4',), 40, 10,
        ('cloud_only', 'cooperllm', 'fedmezo', 'warm_start_zo_swept')),
    'rt_indomain_minilm_lora': Setting(
        'as rt_shifted_minilm_lora, but the public set is 256 Rotten Tomatoes reviews (the '
        'in-distribution case)', _RT + _FEDSGD + _IN_DOMAIN + _LORA, 40, 10,
        ('cloud_only', 'fedmezo', 'cooperllm', 'cooperllm_fixed_rate', 'cooperllm_adaptive',
         'warm_start', 'warm_start_zo_swept'),
        # cooperllm picked lr_V 0.3, the shared grid's top edge, then adaptive cooperllm picked
        # 1, the next grid's: the grid moved up a decade in two steps (the runs at 0.003 and
        # 0.01 stay in the results, outside the grid).
        {'lr_v': (0.03, 0.1, 0.3, 1.0, 3.0)}),
    'rt_shifted_smollm2_lora': Setting(
        'as rt_shifted_minilm_lora with the decoder LLM: SmolLM2-135M, LoRA (q, v; rank 8), the '
        'label words "negative" / "positive" scored after the review',
        _RT + _FEDSGD + _SHIFTED + ('model=smollm2', 'zo.trainable=lora',
                                    "prompt_suffix='\\nSentiment:'",
                                    "label_words=('negative', 'positive')"), 40, 10,
        # The decisive comparison only: a run costs 4-7 min on 2 CPU cores (its sweep's
        # train_seconds, beside a second job), cooperllm's 19-36 beside other jobs (the cloud's
        # backprop and line search every round).
        ('cloud_only', 'cooperllm', 'fedmezo', 'warm_start', 'warm_start_zo_swept'),
        # cloud_only picked 1e-4, the shared AdamW grid's lower edge (validation 0.777 / 0.770 /
        # 0.747 / 0.734 / 0.578 at 1e-4 .. 1e-2; untrained 0.708): the grid moved down a decade
        # (those runs were lost uncommitted; the grid's were rerun).
        {'bp': (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)}),
    '20news_prior_shift_minilm_lora': Setting(
        '20 Newsgroups on 200 clients; public: 256 posts of the first 10 of the 20 groups only (a '
        'class-prior shift); MiniLM, LoRA (q, v; rank 8) + head',
        ('dataset=20news', 'max_length=64', 'num_clients=200', 'clients_per_round=20',
         'partition=dirichlet', 'dirichlet_alpha=1.0', 'min_client_size=4', 'test_fraction=0.1',
         'validation_fraction=0.05', 'public_fraction=0.03', 'cloud.public_examples=256',
         'cloud.public_classes=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)', 'local_steps=1', 'batch_size=8',
         'eval_batch_size=128', 'checkpoint_every=10', 'ledger=False', 'tensorboard=False',
         'zo.distribution=gaussian') + _LORA, 40, 10,
        # The decisive comparison only (a run costs 2-3 times a Rotten Tomatoes run: 64 tokens,
        # 2,824 held-out posts), cooperllm against the cloud alone, the cloud then ZO, and ZO.
        ('cloud_only', 'cooperllm', 'fedmezo', 'warm_start', 'warm_start_zo_swept', 'fedavg_bp'),
        # cooperllm picked the shared grid's top edge (3): the grid moved up a decade (the runs
        # at 0.03 and 0.1 stay in the results, outside the grid).
        {'lr_v_max': (0.3, 1.0, 3.0, 10.0, 30.0)}),
    # ZGR at real dimensions on the embedded default's task (demo.py: 10 clients, 4 a round, 8
    # local steps, 112 in-domain public articles), plain ZO against guided ZO and its ablations.
    'bbc_minilm_lora': Setting(
        'BBC News on 10 clients, in-domain public set; MiniLM, LoRA (q, v; rank 8) + head',
        _bbc('lora'), 20, 5,
        ZGR_CHECKS + ('cloud_only', 'cooperllm_curvature'),
        # "A misleading cloud costs at most 1 point": a seed's test accuracy (444 articles) has
        # about 2.3 points of standard error, so three seeds cannot show it.
        # cooperllm_shuffled (the line search's) runs the usual three seeds (CPU time).
        paired=(('cooperllm_shuffled_adaptive', 'fedmezo'),
                ('cooperllm_fixed_rate_shuffled', 'fedmezo'),
                ('cooperllm_line_adaptive_shuffled', 'fedmezo')),
        paired_seeds=tuple(range(7))),
    'bbc_minilm_full': Setting(
        'BBC News on 10 clients, in-domain public set; MiniLM, every weight trained',
        _bbc('full'), 10, 5,
        ('fedmezo', 'cooperllm', 'cloud_only'),
        # 1e-7..1e-5 first: every rate stayed at chance (0.17-0.18), the top one picked; the
        # grid moved up a decade (the runs below 1e-6 stay in the results, outside the grid).
        # FedMeZO then picked 1e-4, the top edge: the grid moved up to 3e-3, where FedMeZO
        # diverges (train loss 13 at round 10), and it picks 1e-3 (the runs below 1e-5 stay in
        # the results, outside the grid). AdamW on every weight of a pretrained encoder runs a decade below
        # the adapters' rates.
        # cooperllm runs at its default largest lr_V only (the claim is the default's; a run
        # costs 10-15 min on 2 cores), so its one-value "grid" is marked as an edge pick.
        {'zo': (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3), 'bp': (1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
         'lr_v_max': (0.1,)}),
    # The third trainable subset of the one set of defaults from the head to every weight:
    # every bias (BitFit) + the head, cooperllm again at its default largest lr_V only.
    'bbc_minilm_bitfit': Setting(
        'BBC News on 10 clients, in-domain public set; MiniLM, BitFit (every bias) + head',
        _bbc('bitfit'), 20, 5,
        ('fedmezo', 'cooperllm', 'cloud_only'), {'lr_v_max': (0.1,)}),
}

# --quick: the same settings, shrunk so that the whole pipeline runs in minutes.
# An evaluation is most of a quick run's time: 128 test and 128 validation examples (one batch
# each), the test set before and after the run only.
QUICK = dict(rounds=2, eval_every=2, grid=2, seeds=(0, 1),
             overrides=('num_clients=20', 'clients_per_round=4', 'checkpoint_every=0',
                        'test_fraction=0.01', 'validation_fraction=0.01'),
             methods=('cloud_only', 'cooperllm', 'fedmezo', 'warm_start'))

@dataclasses.dataclass(frozen=True)
class Plan:
  """One setting as it runs: its rounds, methods, grids and seeds (shrunk by --quick)."""
  name: str
  setting: Setting
  methods: tuple
  grids: dict
  seeds: tuple
  overrides: tuple
  rounds: int
  paired_seeds: tuple   # the setting's, or none under --quick

  @classmethod
  def of(cls, name: str, methods=(), quick: bool = False) -> 'Plan':
    s = SETTINGS[name]
    methods = tuple(methods) or (QUICK['methods'] if quick else s.methods)
    grids, seeds, extra = {**GRIDS, **(s.grids or {})}, SEEDS, ()   # a setting replaces some
    rounds, eval_every = s.rounds, s.eval_every
    if quick:
      grids = {k: g[len(g) // 2:len(g) // 2 + QUICK['grid']] for k, g in grids.items()}
      rounds, eval_every, seeds, extra = (QUICK['rounds'], QUICK['eval_every'], QUICK['seeds'],
                                          QUICK['overrides'])
    overrides = s.overrides + extra + (f'rounds={rounds}', f'eval_every={eval_every}')
    return cls(name, s, methods, grids, seeds, overrides, rounds, () if quick else s.paired_seeds)

  def seeds_of(self, method: str) -> tuple:
    """The seeds a method runs: the setting's paired seeds for a method in a pair."""
    paired = any(method in p for p in self.setting.paired)
    return self.paired_seeds if paired and self.paired_seeds else self.seeds

  def grid(self, method: str) -> tuple:
    return self.grids[METHODS[method].family]

  def variant(self, method: str, value: float, seed: int, picked: dict) -> tuple:
    """(algorithm, overrides) of one run: the method's knob at `value`, the keys it needs at the
    picks of the methods it depends on."""
    m = METHODS[method]
    overrides = self.overrides + m.overrides + (f'{m.knob}={value}', f'seed={seed}')
    for key, source in m.needs:
      if source not in picked:
        raise ConfigError(f'{self.name}: {method} takes {key} from {source}\'s pick: sweep '
                          f'{source} first (add it to --methods)')
      overrides += (f'{key}={picked[source]}',)
    if m.cloud_phase:
      warm = max(1, self.rounds // 2)
      overrides += (f'warm.rounds={warm}',)
      if m.whole_cloud:   # all the rounds' cloud steps (odd rounds: a one-line config error)
        overrides += (f'warm.cloud_rounds={self.rounds}',)
    return m.algorithm, overrides
