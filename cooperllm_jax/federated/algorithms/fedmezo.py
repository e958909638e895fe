"""fedmezo: ZO local steps (MeZO) with a direction of its own for every (round, client, step,
probe); clients upload the scalars and the edge replays every client's entries (FedAvg)."""

from cooperllm_jax.federated.algorithms.scalar import ScalarProtocol
from cooperllm_jax.federated.registry import register


@register('fedmezo')
class FedMeZO(ScalarProtocol):
  """The plain scalar protocol: ScalarProtocol's defaults are FedMeZO's."""
