"""FSDP2 on CPU for the tests: accelerate 1.16 selects FSDP only on accelerator devices (accelerate/state.py: the
FSDP branch sits inside the MULTI_GPU/.../MULTI_XPU case; on a CPU the state is MULTI_CPU and an FSDP plugin is
dropped, so ``TrainingArguments(fsdp=...)`` trains with DDP and ``accelerate launch`` with an FSDP config does not
shard). ``CpuFsdp2Trainer`` sets the state accelerate sets on a GPU (distributed type FSDP, an FSDP2 plugin) right
after the Trainer builds its Accelerator, so everything after it (PruningTrainer's checks, accelerate's FSDP2
preparation with ``fully_shard``, the Trainer's FSDP save and resume) is the code that runs on GPUs."""

from accelerate import FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType

from hf_prune.adapters import layers_of
from hf_prune.trainer import PruningTrainer


class CpuFsdp2Trainer(PruningTrainer):
    fsdp_version = 2

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        # each transformer layer its own FSDP unit (gathered one at a time), as the documented config does. Named
        # explicitly: accelerate 1.16's default (the model's _no_split_modules) includes BertEmbeddings, whose word
        # embedding it then tries to shard a second time as the input embedding (fully_shard fails on the DTensor)
        layer = type(layers_of(self.model)[0]).__name__
        state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=self.fsdp_version,
                                                           auto_wrap_policy="transformer_based_wrap",
                                                           transformer_cls_names_to_wrap=[layer],
                                                           state_dict_type="FULL_STATE_DICT")
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True
