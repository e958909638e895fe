"""A corpus of user mistakes driven through the entry points in a subprocess (issue 18): every one
exits 2 with exactly one `error:` line, no traceback, and changes no file; one that fails before
training writes none either (every check runs before the workdir is touched). Most fail before any
model is loaded; the resume and replay cases share one tiny run."""

import concurrent.futures
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from test_data_sources import _write_csv
from test_experiment import REPO, _csv

FAST = ('--config=experiments/configs/demo.py:fedmezo', '--config.num_clients=2',
        '--config.clients_per_round=2', '--config.rounds=2', '--config.local_steps=1',
        '--config.batch_size=4', '--config.max_length=16', '--config.min_client_size=2',
        '--config.partition=iid', '--config.test_fraction=0.25', '--progress=false')
# The shared run: 4 rounds, a checkpoint after each (the newest 3 kept) and the ledger.
RUN = (*FAST, '--config.rounds=4', '--config.checkpoint_every=1', '--config.eval_every=2')


def _run_flags(wd):
  """RUN on the shared run's dataset (which lies next to the shared run, outside the copies)."""
  return (*RUN, f'--config.dataset={wd.parent / "tiny.csv"}')


CASES = {}  # name -> (build, a fragment the error line must hold, whether training began)


def case(name, message, trains=False):
  """Registers build(tmp, run, cleanup) -> (module, args): run is the shared run's directory (to
  copy, never to change), cleanup(fn) runs fn after the module's cases. trains: the error comes
  while training, so the run's workdir holds what the rounds before it wrote."""
  def register(build):
    CASES[name] = (build, message, trains)
    return build
  return register


def _files(root: pathlib.Path) -> dict:
  out = {}
  for p in sorted(root.rglob('*')):
    if p.is_file() and not p.is_symlink():
      out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def _run(module, *args, timeout=300):
  return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _train(*args):
  return 'experiments.train', args


def _model_dir(tmp, config_edit=None, tokenizer=True):
  """A copy of MiniLM's directory (weights linked, not copied) with config.json edited."""
  from cooperllm_jax import assets  # pylint: disable=g-import-not-at-top
  src, dst = assets.MINILM.path(), tmp / 'model'
  dst.mkdir()
  (dst / 'model.safetensors').symlink_to(src / 'model.safetensors')
  config = json.loads((src / 'config.json').read_text())
  (dst / 'config.json').write_text(json.dumps(config_edit(config) if config_edit else config))
  if tokenizer:
    for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt'):
      shutil.copy(src / name, dst / name)
  return dst


# -- flags and config --------------------------------------------------------------------------

for _name, _flag, _message in [
    ('unknown_field', '--config.foo=1', '--config.foo is not a config field (--help lists'),
    ('unknown_nested_field', '--config.zo.nope=1', '--config.zo.nope is not a config field'),
    ('misspelled_field', '--config.learning_rte=0.1',
     '--config.learning_rte is not a config field; did you mean --config.learning_rate?'),
    ('misspelled_section', '--config.zoo.eps=0.1', 'did you mean --config.zo.eps?'),
    ('int_flag_not_a_number', '--config.rounds=abc', 'flag --config.rounds=abc'),
    ('float_flag_not_a_number', '--config.learning_rate=fast', 'flag --config.learning_rate'),
    ('bool_flag_not_a_bool', '--overwrite=maybe', 'flag --overwrite=maybe'),
    ('unknown_flag', '--nosuchflag', "Unknown command line flag 'nosuchflag'"),
    ('positional_argument', 'extra', "unexpected arguments: ['extra']"),
    ('missing_config_file', '--config=missing_config.py', 'cannot load the config file'),
    ('unknown_config_name', '--config=experiments/configs/demo.py:nosuch', "unknown algorithm"),
    ('unsupported_dtype', '--config.dtype=float99', "dtype 'float99' is not supported"),
    ('unsupported_param_dtype', '--config.param_dtype=int8', "param_dtype 'int8' is not"),
    ('negative_seed', '--config.seed=-1', 'seed must be >= 0'),
    ('infinite_learning_rate', '--config.learning_rate=inf', 'learning_rate must be finite'),
    ('nan_learning_rate', '--config.learning_rate=nan', 'learning_rate must be finite'),
    ('infinite_cloud_rate', '--config.cloud.learning_rate=inf', 'cloud.learning_rate must be'),
    ('zero_rounds', '--config.rounds=0', 'rounds must be >= 1'),
]:
  case(_name, _message)(lambda tmp, run, cleanup, flag=_flag: _train(f'--workdir={tmp / "wd"}',
                                                                     flag))


@case('broken_config_file', 'SyntaxError')
def _(tmp, run, cleanup):
  (tmp / 'bad.py').write_text('def get_config(:\n')
  return _train(f'--workdir={tmp / "wd"}', f'--config={tmp / "bad.py"}')


@case('config_file_that_raises', "NameError: name 'undefined_name' is not defined")
def _(tmp, run, cleanup):
  (tmp / 'bad.py').write_text('def get_config():\n  return undefined_name\n')
  return _train(f'--workdir={tmp / "wd"}', f'--config={tmp / "bad.py"}')


@case('missing_workdir_flag', '--workdir is required')
def _(tmp, run, cleanup):
  return _train()


@case('resume_and_overwrite', 'pass one of them')
def _(tmp, run, cleanup):
  return _train(f'--workdir={tmp / "wd"}', '--resume', '--overwrite')


# -- data --------------------------------------------------------------------------------------

def _data(path, *extra):
  return _train(f'--workdir={path.parent / "wd"}', *FAST, f'--config.dataset={path}', *extra)


@case('label_far_above_the_others', '100000, is in row 12')
def _(tmp, run, cleanup):
  rows = [f'text number {i},{i % 3}' for i in range(12)] + ['the stray one,100000']
  return _data(_write_csv(tmp / 'stray.csv', rows))


@case('single_class', 'needs at least 2 classes')
def _(tmp, run, cleanup):
  return _data(_write_csv(tmp / 'one.csv', [f'text number {i},sport' for i in range(12)]))


@case('mixed_text_and_integer_labels_csv', "row 12: label '1' is an integer")
def _(tmp, run, cleanup):
  rows = [f'text number {i},{"sport" if i % 2 else "money"}' for i in range(12)] + ['odd one,1']
  return _data(_write_csv(tmp / 'mixed.csv', rows))


@case('mixed_label_types_json', "row 1: label 'x' is text")
def _(tmp, run, cleanup):
  (tmp / 'mixed.jsonl').write_text('{"text": "a b", "label": 0}\n{"text": "c d", "label": "x"}\n')
  return _data(tmp / 'mixed.jsonl')


@case('empty_json', 'the file is empty')
def _(tmp, run, cleanup):
  (tmp / 'empty.json').write_text('')
  return _data(tmp / 'empty.json')


@case('header_only_csv', 'cannot read as csv')
def _(tmp, run, cleanup):
  return _data(_write_csv(tmp / 'empty.csv', []))


@case('missing_dataset', 'nor an existing file')
def _(tmp, run, cleanup):
  return _data(tmp / 'nope.csv')


@case('unsupported_dataset_suffix', "unsupported file type '.xlsx'")
def _(tmp, run, cleanup):
  (tmp / 'data.xlsx').write_text('text,label\n')
  return _data(tmp / 'data.xlsx')


@case('no_text_column', "no column 'text'")
def _(tmp, run, cleanup):
  return _data(_write_csv(tmp / 'cols.csv', ['a,0', 'b,1'], header='body,label'))


@case('label_column_the_file_lacks', "no column 'topic' (label_column); the columns are body, label")
def _(tmp, run, cleanup):
  path = _write_csv(tmp / 'cols.csv', ['a,0', 'b,1'], header='body,label')
  return _data(path, '--config.text_column=body', '--config.label_column=topic')


@case('column_option_for_a_named_dataset', "bbcnews takes no options, got ['text_column']")
def _(tmp, run, cleanup):
  return _train(f'--workdir={tmp / "wd"}', *FAST, '--config.text_column=body')


@case('text_and_label_the_same_column', "text_column and label_column are both 'label'")
def _(tmp, run, cleanup):
  return _data(_csv(tmp), '--config.text_column=label')


@case('repeated_label_names', "label_names must be distinct non-empty names, got ['a', 'a']")
def _(tmp, run, cleanup):
  return _data(_csv(tmp), "--config.label_names=('a', 'a')")


@case('negative_label', 'label -1 is outside')
def _(tmp, run, cleanup):
  return _data(_write_csv(tmp / 'neg.csv', ['a b,0', 'c d,-1']))


# -- models ------------------------------------------------------------------------------------

def _model(tmp, model, *extra):
  return _train(f'--workdir={tmp / "wd"}', *FAST, f'--config.dataset={_csv(tmp)}',
                f'--config.model={model}', *extra)


@case('model_without_tokenizer_files', 'no tokenizer files')
def _(tmp, run, cleanup):
  return _model(tmp, _model_dir(tmp, tokenizer=False))


@case('tokenizer_of_another_vocabulary',
      'embedding has 1000 rows: tokenizer and model do not match')
def _(tmp, run, cleanup):
  return _model(tmp, _model_dir(tmp, lambda c: dict(c, vocab_size=1000)))


@case('config_sizes_disagree_with_weights', 'has shape (384,), expected (768,)')
def _(tmp, run, cleanup):
  return _model(tmp, _model_dir(tmp, lambda c: dict(c, hidden_size=768, intermediate_size=3072)))


@case('config_sizes_inconsistent', 'hidden_size must be divisible by num_heads')
def _(tmp, run, cleanup):
  return _model(tmp, _model_dir(tmp, lambda c: dict(c, num_attention_heads=5)))


@case('config_field_missing', "no field 'intermediate_size'")
def _(tmp, run, cleanup):
  return _model(tmp, _model_dir(tmp, lambda c: {k: v for k, v in c.items()
                                                if k != 'intermediate_size'}))


@case('max_length_past_the_position_table', 'max_length=1000 exceeds the 512 positions')
def _(tmp, run, cleanup):
  return _model(tmp, 'minilm', '--config.max_length=1000')


@case('missing_model', 'neither an embedded name')
def _(tmp, run, cleanup):
  return _model(tmp, tmp / 'no_such_model')


@case('lora_target_the_model_lacks', "lora target 'q_prj' is not a layer weight of this model; "
      'choose from attn/k, attn/o, attn/q, attn/v, mlp/down, mlp/up (or their PEFT names q_proj')
def _(tmp, run, cleanup):
  return _model(tmp, 'minilm', '--config.zo.trainable=lora', "--config.zo.lora_targets=('q_prj',)")


# -- sizes the data or the model cannot give ---------------------------------------------------

@case('batch_larger_than_every_client', "batch_size=100000 exceeds every client's data (the "
      'largest of the 2 clients holds 14 examples)')
def _(tmp, run, cleanup):
  return _data(_csv(tmp), '--config.batch_size=100000')


@case('guidance_pool_larger_than_the_trained_weights',
      'zgr.pool_size=10000 exceeds the 770 weights the clients train (zo.trainable=head)')
def _(tmp, run, cleanup):
  return _data(_csv(tmp), '--config.algorithm=cooperllm', '--config.zgr.pool_size=10000')


# -- workdir -----------------------------------------------------------------------------------

@case('overwrite_a_model_directory', 'was not created by a run')
def _(tmp, run, cleanup):
  return _train(f'--workdir={_model_dir(tmp)}', '--overwrite')


@case('overwrite_a_folder_with_its_own_config_json', 'was not created by a run')
def _(tmp, run, cleanup):
  (tmp / 'mine').mkdir()
  (tmp / 'mine' / 'config.json').write_text('{"theme": "dark"}')
  return _train(f'--workdir={tmp / "mine"}', '--overwrite')


@case('overwrite_a_run_holding_a_user_file', "holds 'notes.txt', which no run writes")
def _(tmp, run, cleanup):
  wd = tmp / 'run'
  shutil.copytree(run, wd, symlinks=True)
  (wd / 'notes.txt').write_text('mine')
  return _train(f'--workdir={wd}', '--overwrite')


@case('empty_workdir_flag', '--workdir is empty')
def _(tmp, run, cleanup):
  return _train('--workdir=', '--overwrite')


@case('workdir_is_the_cwd', 'the current directory or one of its parents')
def _(tmp, run, cleanup):
  return _train('--workdir=.', '--overwrite')


@case('workdir_is_a_parent_of_the_cwd', 'the current directory or one of its parents')
def _(tmp, run, cleanup):
  return _train('--workdir=..', '--overwrite')


@case('workdir_is_the_root', 'the current directory or one of its parents')
def _(tmp, run, cleanup):
  return _train('--workdir=/', '--overwrite')


@case('workdir_is_home', 'the home directory or the repository')
def _(tmp, run, cleanup):
  return _train('--workdir=~', '--overwrite')


@case('workdir_below_a_file', 'is a file, not a directory')
def _(tmp, run, cleanup):
  (tmp / 'file.txt').write_text('x')
  return _train(f'--workdir={tmp / "file.txt" / "wd"}')


@case('workdir_is_a_file', 'is a file, not a directory')
def _(tmp, run, cleanup):
  (tmp / 'file.txt').write_text('x')
  return _train(f'--workdir={tmp / "file.txt"}')


@case('workdir_not_empty', 'pass --overwrite')
def _(tmp, run, cleanup):
  (tmp / 'wd').mkdir()
  (tmp / 'wd' / 'precious.txt').write_text('keep me')
  return _train(f'--workdir={tmp / "wd"}')


@case('workdir_read_only', 'is not writable')
def _(tmp, run, cleanup):
  if os.geteuid() == 0:
    pytest.skip('root writes to read-only directories (workdir_immutable covers it)')
  (tmp / 'ro').mkdir(mode=0o500)
  return _train(f'--workdir={tmp / "ro" / "wd"}')


@case('workdir_immutable', 'is not writable')
def _(tmp, run, cleanup):
  (tmp / 'frozen').mkdir()
  if subprocess.run(['chattr', '+i', str(tmp / 'frozen')], capture_output=True).returncode:
    pytest.skip('chattr +i is not permitted here')
  cleanup(lambda: subprocess.run(['chattr', '-i', str(tmp / 'frozen')], check=True))
  return _train(f'--workdir={tmp / "frozen" / "wd"}')


# -- resume and replay (on a copy of the shared run) --------------------------------------------

def _copy(tmp, run, damage):
  wd = tmp / 'run'
  shutil.copytree(run, wd, symlinks=True)
  damage(wd)
  return wd


def _resume(tmp, run, damage, *extra):
  return _train(f'--workdir={_copy(tmp, run, damage)}', *_run_flags(run), *extra, '--resume')


def _replay(tmp, run, damage, *extra):
  return 'experiments.replay', (f'--workdir={_copy(tmp, run, damage)}', *extra)


def _newest_gone(wd):
  shutil.rmtree(wd / 'checkpoints' / '4')


def _corrupt(path):
  path.write_bytes(path.read_bytes()[:100])


def _zero_all_checkpoints(wd):
  for step in (wd / 'checkpoints').iterdir():
    if step.name.isdigit():
      victim = max((step / 'state').rglob('*'),
                   key=lambda p: p.stat().st_size if p.is_file() else -1)
      victim.write_bytes(b'\0' * victim.stat().st_size)


@case('resume_newest_checkpoint_gone_and_ledger_record_damaged', 'no usable checkpoint')
def _(tmp, run, cleanup):
  return _resume(tmp, run, lambda wd: (_newest_gone(wd), _corrupt(wd / 'ledger/00000001.npz')))


@case('resume_newest_checkpoint_gone_and_ledger_record_missing', 'no usable checkpoint')
def _(tmp, run, cleanup):
  return _resume(tmp, run, lambda wd: (_newest_gone(wd), (wd / 'ledger/00000002.npz').unlink()))


@case('resume_newest_checkpoint_gone_and_ledger_meta_damaged', 'no usable checkpoint')
def _(tmp, run, cleanup):
  return _resume(tmp, run, lambda wd: (_newest_gone(wd), _corrupt(wd / 'ledger/meta.json')))


@case('resume_newest_checkpoint_gone_and_ledger_directory_gone', 'no usable checkpoint')
def _(tmp, run, cleanup):
  return _resume(tmp, run, lambda wd: (_newest_gone(wd), shutil.rmtree(wd / 'ledger')))


@case('resume_every_checkpoint_corrupt', 'no usable checkpoint')
def _(tmp, run, cleanup):
  return _resume(tmp, run, _zero_all_checkpoints)


@case('resume_with_another_seed', 'seed: 0 -> 3')
def _(tmp, run, cleanup):
  return _resume(tmp, run, lambda wd: None, '--config.seed=3')


@case('resume_with_fewer_rounds', 'has rounds=4, and rounds=3 would end it earlier')
def _(tmp, run, cleanup):
  return _resume(tmp, run, lambda wd: None, '--config.rounds=3')


@case('resume_a_directory_without_a_run', 'holds no run')
def _(tmp, run, cleanup):
  (tmp / 'wd').mkdir()
  return _train(f'--workdir={tmp / "wd"}', *RUN, '--resume')


@case('replay_ledger_record_damaged', '00000003.npz: corrupt ledger record')
def _(tmp, run, cleanup):
  return _replay(tmp, run, lambda wd: _corrupt(wd / 'ledger/00000003.npz'))


@case('replay_ledger_meta_missing', 'no readable ledger meta.json')
def _(tmp, run, cleanup):
  return _replay(tmp, run, lambda wd: (wd / 'ledger/meta.json').unlink())


@case('replay_without_checkpoints', 'no checkpoints to compare')
def _(tmp, run, cleanup):
  return _replay(tmp, run, lambda wd: shutil.rmtree(wd / 'checkpoints'))


@case('replay_every_checkpoint_corrupt', 'no readable checkpoint')
def _(tmp, run, cleanup):
  return _replay(tmp, run, _zero_all_checkpoints)


@case('replay_without_config_json', 'holds no run')
def _(tmp, run, cleanup):
  return _replay(tmp, run, lambda wd: (wd / 'config.json').unlink())


@case('replay_unknown_flag', "Unknown command line flag 'rounds'")
def _(tmp, run, cleanup):
  return _replay(tmp, run, lambda wd: None, '--rounds=3')


@case('replay_missing_workdir_flag', 'Flag --workdir must have a value')
def _(tmp, run, cleanup):
  return 'experiments.replay', ()


# -- training that cannot go on ----------------------------------------------------------------

@case('divergence_guard_gives_up', 'after 1 rollbacks; lower learning_rate', trains=True)
def _(tmp, run, cleanup):
  # threefry's Gaussian directions: the hashed ones' steps at this rate happen to separate the
  # tiny set instead of blowing up
  return _train(f'--workdir={tmp / "wd"}', *FAST, f'--config.dataset={_csv(tmp)}',
                '--config.learning_rate=1e9', '--config.rounds=4', '--config.guard.max_rollbacks=1',
                '--config.zo.distribution=gaussian')


@pytest.fixture(scope='module')
def shared_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('shared')
  proc = _run('experiments.train', f'--workdir={root / "run"}', *RUN,
              f'--config.dataset={_csv(root)}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / 'run'


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory, shared_run):
  """{name: (process, files before, tmp) or why it was skipped}: every case built in a directory
  of its own, then their subprocesses run two at a time (most of each is start-up)."""
  built, out, cleanups = {}, {}, []
  for name, (build, _, _) in CASES.items():
    tmp = tmp_path_factory.mktemp(name)
    try:
      built[name] = (*build(tmp, shared_run, cleanups.append), _files(tmp), tmp)
    except pytest.skip.Exception as e:
      out[name] = str(e)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    jobs = {name: pool.submit(_run, module, *args) for name, (module, args, _, _) in built.items()}
    out.update({name: (job.result(), *built[name][2:]) for name, job in jobs.items()})
  yield out
  for fn in cleanups:
    fn()


@pytest.mark.parametrize('name', list(CASES))
def test_user_error_is_one_line_exit_2_and_changes_no_file(outcomes, name):
  if isinstance(outcomes[name], str):
    pytest.skip(outcomes[name])
  proc, before, tmp = outcomes[name]
  output = proc.stdout + proc.stderr
  errors = [l for l in output.splitlines() if l.startswith('error:')]
  assert proc.returncode == 2 and len(errors) == 1, output[-3000:]
  _, message, trains = CASES[name]
  assert 'Traceback' not in output and message in errors[0], output[-3000:]
  after = _files(tmp)
  # No file changed, and (unless training began) none written.
  assert (after if not trains else {k: after.get(k) for k in before}) == before


@pytest.mark.slow
def test_resume_repairs_a_damaged_ledger_from_an_older_checkpoint(tmp_path, shared_run):
  """Ledger record 4 damaged, metrics.jsonl deleted: checkpoint 4 no longer matches its ledger, so
  the run goes on from checkpoint 3 (whose ledger verifies), rewrites round 4 and ends as the
  undamaged run did; the summary keeps the starting accuracy; the replay verifies."""
  wd = tmp_path / 'run'
  shutil.copytree(shared_run, wd, symlinks=True)
  _corrupt(wd / 'ledger' / '00000004.npz')
  (wd / 'metrics.jsonl').unlink()
  proc = _run('experiments.train', f'--workdir={wd}', *_run_flags(shared_run), '--resume')
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The log lines go through absl logging (stderr); stdout has the summary line.
  assert 'checkpoint 4: the ledger' in proc.stderr and 'resuming after round 3' in proc.stderr
  summary, original = (json.loads((d / 'summary.json').read_text()) for d in (wd, shared_run))
  for key in ('accuracy_before', 'accuracy_after'):
    assert summary[key] == original[key]
  rows = [json.loads(l, parse_constant=pytest.fail) for l in
          (wd / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [4]
  replay = _run('experiments.replay', f'--workdir={wd}')
  assert 'equal bit for bit to checkpoints 2, 3, 4' in replay.stdout, replay.stderr[-3000:]


@pytest.mark.slow
def test_resume_of_a_finished_run_keeps_its_result_or_extends_it(tmp_path, shared_run):
  """A finished run resumed again ends as it did (its last round evaluated again); resumed with
  more rounds it goes on, evaluates its last round although eval_every skips it, clamps an
  evaluation batch past the test split with a log line, and records its new rounds, so a later
  resume cannot cut it back."""
  wd = tmp_path / 'run'
  shutil.copytree(shared_run, wd, symlinks=True)
  original = json.loads((shared_run / 'summary.json').read_text())
  again = _run('experiments.train', f'--workdir={wd}', *_run_flags(shared_run), '--resume')
  assert again.returncode == 0, again.stderr[-3000:]
  summary = json.loads((wd / 'summary.json').read_text())
  assert (summary['rounds'], summary['accuracy_after']) == (4, original['accuracy_after'])
  longer = _run('experiments.train', f'--workdir={wd}', *_run_flags(shared_run), '--resume',
                '--config.rounds=5', '--config.eval_batch_size=100000')
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert 'eval_batch_size=100000 clamped to 10, the largest split evaluated' in longer.stderr
  rows = [json.loads(l) for l in (wd / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [0, 1, 2, 3, 4, 5] and 'test_accuracy' in rows[-1]
  summary = json.loads((wd / 'summary.json').read_text())
  assert (summary['rounds'], summary['accuracy_after']) == (5, rows[-1]['test_accuracy'])
  assert json.loads((wd / 'config.json').read_text())['rounds'] == 5
  cut = _run('experiments.train', f'--workdir={wd}', *_run_flags(shared_run), '--resume')
  assert cut.returncode == 2 and 'has rounds=5, and rounds=4 would end it earlier' in cut.stderr


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
  """The disk of the workdir fills up after the first checkpoint: one line naming a file in the
  workdir, exit 2, no traceback (orbax's, tensorboard's), and the checkpoints written stay."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8M', 'tmpfs', str(disk)],
                    capture_output=True).returncode:
    pytest.skip('mounting a small tmpfs (to fill it) is not permitted here')
  try:
    wd = disk / 'wd'
    cmd = [sys.executable, '-m', 'experiments.train', f'--workdir={wd}', *FAST,
           f'--config.dataset={_csv(tmp_path)}', '--config.rounds=500',
           '--config.checkpoint_every=1']
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    while proc.poll() is None and not (wd / 'checkpoints' / '1').is_dir():
      time.sleep(0.05)
    with open(disk / 'filler', 'wb') as f:
      with contextlib.suppress(OSError):
        while True:
          f.write(b'\0' * 2**16)
          f.flush()
    out, err = proc.communicate(timeout=300)
    errors = [l for l in (out + err).splitlines() if l.startswith('error:')]
    assert proc.returncode == 2 and len(errors) == 1, err[-3000:]
    assert f'No space left on device: {wd}' in errors[0] and 'Traceback' not in out + err
    assert (wd / 'checkpoints' / '1').is_dir()
  finally:
    subprocess.run(['umount', str(disk)], check=True)
