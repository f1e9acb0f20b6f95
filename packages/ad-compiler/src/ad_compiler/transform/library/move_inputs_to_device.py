"""move_inputs_to_device (stage weight_load): every tensor the graph reads and every device constant on the target device."""

from torch.fx import GraphModule

from ...export.devices import move_tensors, retarget_device_constants
from ...models.factory import ModelFactory
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


@TransformRegistry.register("move_inputs_to_device")
class MoveInputsToDevice(BaseTransform):
    """Before: buffers/constants on the CPU, `aten.to.device(x, meta)`.  After: both on `shared_config.device`.

    Matches = tensors moved + nodes whose device argument changed (0 when everything was in place).
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        moved = move_tensors(gm, shared_config.device)
        changed = retarget_device_constants(gm, shared_config.device)
        return gm, TransformInfo(num_matches=moved + changed)
