"""Device memory of a jitted function, as XLA plans it: measured without running (or allocating).

Wall-clock peaks on a shared accelerator are noisy and CPU has no allocator statistics at all, so
memory claims (e.g. "a ZO step needs about one forward pass") are checked against the compiler's
buffer assignment instead, which is deterministic and works from abstract shapes.
"""

import jax

def compiled_memory(fn, *args, donate_argnums=()) -> dict:
  """XLA's static memory estimate of jax.jit(fn, donate_argnums)(*args), in bytes.

  args may be arrays, Python scalars or jax.ShapeDtypeStruct: it compiles, never runs, so nothing
  is allocated.
  Returns argument/output/temp/alias bytes and

      peak_bytes = argument + output + temp - alias

  i.e. everything live at once, counting a donated input that is reused as an output once. It is
  the compiler's plan for one call, not a measurement: `temp` is the block XLA's buffer assignment
  reserves for intermediates (buffers never live together share space in it), and the runtime's
  own overheads and allocator fragmentation are not counted.
  """
  return memory_of(jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile())


def memory_of(compiled) -> dict:
  """compiled_memory's dict for an already compiled function (jax.stages.Compiled), so a caller
  that also runs it (benchmarks) compiles once."""
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f'XLA gave no memory analysis for this function on backend '
                       f'{jax.default_backend()!r}; compiled_memory needs a backend that reports '
                       'one (CPU, GPU and TPU do)')
  out = {'argument_bytes': int(stats.argument_size_in_bytes),
         'output_bytes': int(stats.output_size_in_bytes),
         'temp_bytes': int(stats.temp_size_in_bytes),
         'alias_bytes': int(stats.alias_size_in_bytes)}
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] + out['temp_bytes']
                       - out['alias_bytes'])
  return out
