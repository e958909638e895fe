"""summary.json's provenance: versions, the commit of this checkout (None elsewhere), devices and
the command line."""

import pathlib
import shlex
import shutil
import subprocess
import sys

import jax
import pytest

from cooperllm_jax.run import provenance as provenance_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_provenance_names_versions_devices_and_command():
  p = provenance_lib.provenance()
  assert p['jax'] == jax.__version__ and p['jaxlib']
  assert p['device_kind'] == jax.devices()[0].device_kind and p['device_count'] >= 1
  # This process's own command line, as Python was started (pytest's, or an xdist worker's).
  assert p['command'] == shlex.join(sys.orig_argv)


@pytest.mark.skipif(shutil.which('git') is None or not (REPO / '.git').exists(),
                    reason='not a git checkout')
def test_commit_of_this_checkout():
  head = subprocess.run(['git', '-C', str(REPO), 'rev-parse', 'HEAD'], capture_output=True,
                        text=True, check=True).stdout.strip()
  commit = provenance_lib.git_commit()
  assert commit is not None and commit.split('-')[0] == head


def test_no_commit_outside_a_checkout_or_inside_another_repository(tmp_path):
  package = tmp_path / 'site-packages' / 'cooperllm_jax'
  package.mkdir(parents=True)
  assert provenance_lib.git_commit(package) is None          # no repository at all
  if shutil.which('git') is None:
    return
  git = ['git', '-C', str(tmp_path), '-c', 'user.name=u', '-c', 'user.email=u@x']
  subprocess.run([*git, 'init', '-q'], check=True)
  subprocess.run([*git, 'commit', '-q', '--allow-empty', '-m', 'theirs'], check=True)
  assert provenance_lib.git_commit(package) is None          # a user's repository around a venv
  assert provenance_lib.git_commit(tmp_path / 'site-packages') is not None  # ... whose own it is
