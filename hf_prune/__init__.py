"""hf_prune: structured pruning (whole layers, attention heads, FFN neurons) for Hugging Face transformers 5."""

from .adapters import ArchAdapter, get_adapter, register_adapter, supported_model_types
from .api import prune
from .budget import build_plan
from .callbacks import PruningCallback  # noqa: E402  (after the engine: it builds on it)
from .checkpoint import CorruptCheckpointError, load_plan, load_pruned
from .config import PruningConfig
from .costs import (
    CostModel,
    DecodeLatency,
    Latency,
    benchmark_latency,
    compare_decode,
    compare_latency,
    count_flops,
    count_params,
    plan_flops,
    plan_params,
)
from .criteria import CRITERIA, Criterion, register_criterion
from .depth import LAYER_CRITERIA, LayerCriterion, layer_importance, register_layer_criterion
from .embeddings import save_sentence_transformer, sentence_batches
from .export import NotStockExpressible, save_pruned, save_stock
from .formats import ExportFormat, export_model, register_export_format, save_decilm, save_gguf, save_onnx
from .hidden import HIDDEN_CRITERIA, HiddenCriterion, hidden_importance, register_hidden_criterion
from .hub import check_can_push, model_card, push_pruned, write_model_card
from .importance import ImportanceScores, compute_importance
from .masks import LayerMasks, mask_hooks
from .methods import PruningMethod, register_method
from .model_kinds import ModelKind, register_model_kind
from .modeling_pruned import pruned_class
from .plan import PlanMismatchError, PrunePlan
from .retraining_free import (
    FisherInfo,
    LatencyTable,
    MaskTuning,
    fisher_information,
    fold_tuning_,
    measure_latency_table,
    prune_retraining_free,
    rearrange_across_layers,
    rearrange_masks,
    retraining_free_plan,
    search_latency,
    search_masks,
    tune_masks,
)
from .schedule import PruningSchedule
from .surgery import apply_plan_
from .trainer import DistillationConfig, PruningTrainer  # noqa: E402
from .unit_kinds import UnitKind, register_unit_kind

__version__ = "0.1.0"

__all__ = [
    "ExportFormat",
    "export_model",
    "register_export_format",
    "PruningMethod",
    "register_method",
    "register_unit_kind",
    "retraining_free_plan",
    "UnitKind",
    "ModelKind",
    "register_model_kind",
    "save_sentence_transformer",
    "sentence_batches",
    "save_decilm",
    "save_gguf",
    "save_onnx",
    "ArchAdapter",
    "CRITERIA",
    "CorruptCheckpointError",
    "Criterion",
    "DistillationConfig",
    "CostModel",
    "DecodeLatency",
    "FisherInfo",
    "ImportanceScores",
    "LAYER_CRITERIA",
    "LayerCriterion",
    "LayerMasks",
    "NotStockExpressible",
    "Latency",
    "LatencyTable",
    "MaskTuning",
    "PlanMismatchError",
    "PruningCallback",
    "PruningConfig",
    "PruningSchedule",
    "PruningTrainer",
    "PrunePlan",
    "apply_plan_",
    "benchmark_latency",
    "build_plan",
    "check_can_push",
    "compare_decode",
    "compare_latency",
    "compute_importance",
    "count_flops",
    "count_params",
    "fisher_information",
    "fold_tuning_",
    "get_adapter",
    "layer_importance",
    "hidden_importance",
    "HIDDEN_CRITERIA",
    "HiddenCriterion",
    "register_hidden_criterion",
    "load_plan",
    "load_pruned",
    "mask_hooks",
    "measure_latency_table",
    "model_card",
    "plan_flops",
    "plan_params",
    "prune",
    "prune_retraining_free",
    "pruned_class",
    "push_pruned",
    "rearrange_across_layers",
    "rearrange_masks",
    "register_adapter",
    "register_criterion",
    "register_layer_criterion",
    "search_latency",
    "save_pruned",
    "save_stock",
    "search_masks",
    "supported_model_types",
    "tune_masks",
    "write_model_card",
]
