"""What `pip install .` ships: every package of cooperllm_jax (a subpackage missing from
pyproject's list would be left out of a wheel silently), py.typed, the packaged default config and
the console script's entry point; experiments/ is the checkout's and is not installed."""

import pathlib
import subprocess
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / 'pyproject.toml').read_text())


def test_every_package_is_listed_and_experiments_is_not():
  setuptools = PYPROJECT['tool']['setuptools']
  listed = set(setuptools['packages'])
  on_disk = {'.'.join(p.parent.relative_to(REPO).parts)
             for p in (REPO / 'cooperllm_jax').rglob('__init__.py')}
  on_disk |= {'cooperllm_jax.kernels'}          # kernels/ installs under the package
  assert listed == on_disk, listed ^ on_disk
  assert setuptools['package-dir']['cooperllm_jax.kernels'] == 'kernels'
  assert not any(p.split('.')[0] == 'experiments' for p in listed)
  assert 'py.typed' in PYPROJECT['tool']['setuptools']['package-data']['cooperllm_jax']
  assert (REPO / 'cooperllm_jax' / 'py.typed').exists()
  assert 'assets' not in PYPROJECT['project']['optional-dependencies']   # --no-deps, documented


def test_console_script_runs_the_packaged_default_config():
  module, _, attr = PYPROJECT['project']['scripts']['cooperllm-train'].partition(':')
  # In a subprocess: the module defines absl flags, which must not clash with other tests'.
  proc = subprocess.run([sys.executable, '-c', f'import {module} as m; assert callable(m.{attr}); '
                         'print(m.DEFAULT_CONFIG)'], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  default = pathlib.Path(proc.stdout.strip())
  assert default.is_relative_to(REPO / 'cooperllm_jax') and default.exists()
  from experiments.configs import demo   # pylint: disable=g-import-not-at-top
  from cooperllm_jax.configs import default as packaged   # pylint: disable=g-import-not-at-top
  assert demo.get_config is packaged.get_config       # one place for the default run
