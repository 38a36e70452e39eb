"""The task-head policy: which modules a delta trains and saves whole by default, and
which PEFT task type (the auto class a model loads with) a Hugging Face model has."""
from __future__ import annotations

from torch import nn

from .targets import named_base_modules

_HEADED = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


def default_heads(model: nn.Module, config=None) -> list[str]:
    """The freshly initialised task head of a *ForSequenceClassification-style model,
    trained and saved with every delta unless modules_to_save says otherwise (PEFT's task_type);
    plus, for a method that needs them (`config.head_extras`), those pretrained modules of such a model
    (adapters: BERT's pooler, without which their signal reaches the classifier only through a frozen layer)."""
    if not type(model).__name__.endswith(_HEADED):
        return []
    heads = [n for n in ("classifier", "score", "qa_outputs") if hasattr(model, n)]
    extras = getattr(config, "head_extras", ())
    return heads + [path for path, _ in named_base_modules(model) if path and path.rpartition(".")[2] in extras]


def peft_task_type(model) -> str:
    """PEFT's task_type for a Hugging Face model class (it picks PEFT's wrapper class on load, and
    `deltatune merge` the auto class the base model loads with)."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False) and name.endswith(("ForConditionalGeneration",
                                                                             "ForSeq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    for suffix, kind in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return kind
    return "FEATURE_EXTRACTION"
