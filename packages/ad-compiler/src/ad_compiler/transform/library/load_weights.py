"""load_weights (stage weight_load): fill the meta parameters on the target device through the factory."""

from torch.fx import GraphModule

from ...errors import CompileError
from ...export.devices import retarget_device_constants
from ...models.factory import ModelFactory
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


@TransformRegistry.register("load_weights")
class LoadWeights(BaseTransform):
    """Before: parameters on meta.  After: checkpoint (or seeded random) values on `shared_config.device`.

    `factory.load_or_random_init` goes through `load_state_dict`, so sharding load hooks slice tensors.
    The graph's baked-in trace device (meta) is pointed at the real device too, else it is not runnable.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        if factory is None:
            raise CompileError("load_weights needs a model factory")
        factory.load_or_random_init(gm, shared_config.device)
        retarget_device_constants(gm, shared_config.device)
        return gm, TransformInfo(num_matches=1)
