"""The bundled models, their weights, datasets, tasks, evaluators and training scripts.

No generic package imports this one: slimtorch finds it through the ``slimtorch.plugins``
entry point (:mod:`slimtorch.core.plugins`), which imports it before the first lookup in a
registry it fills. Importing it registers everything below (each module registers its own).

=================  ==========================================================================
module             registers / holds
=================  ==========================================================================
lenet, resnet      models ``lenet300-fashion``, ``lenet5-fashion``, ``resnet18-fashion``
char_lstm          model ``char-lstm`` (textgenrnn's weights, vocabulary, windows)
austen_lm          model ``austen-lm``, tokenizer ``builtin:austen-lm``, text splits
minilm             model ``minilm``, tokenizer ``builtin:minilm``
smollm2            model ``smollm2-135m`` (a GGUF file), tokenizer ``builtin:smollm2-135m``
data_images        Fashion-MNIST, builtin:mnist5k and .npz image datasets
data_text          texts ``builtin:austen``, ``builtin:wikipedia``; the Lee documents
tasks              tasks ``classification``, ``charlm``, ``sentences``, ``causal-lm``
evaluators         evaluators ``accuracy``, ``lee``, ``bpc``, ``perplexity``
train_*            scripts that made the weights (``python -m slimtorch.zoo.train_lenet``)
weights/, data/    the committed weights and the small bundled test set
=================  ==========================================================================

How to add a builtin model (every file is under ``src/slimtorch/zoo/``):

1. ``NAME.py``: ``build(pretrained) -> nn.Module``, ``example_inputs(batch)``, and
   ``MODELS.add("NAME", BuiltinModel(..., evaluator=..., task=..., data=...))`` naming an
   evaluator and a task that exist (``slimtorch.models.registry.BuiltinModel``).
2. ``__init__.py``: import ``NAME`` below (tests/zoo/test_zoo_init.py fails on a module that
   nobody imports).
3. ``weights/``: its weights (and ``train_NAME.py`` if slimtorch trains them).

A new metric or training data adds an entry to ``evaluators.py`` (an ``Evaluator``) or
``tasks.py`` (a task factory), and a new dataset a loader in ``data_*.py``; generic code never
changes. Tests go to ``tests/zoo/test_NAME.py``.
"""

from slimtorch.zoo import (  # noqa: F401
    austen_lm,
    char_lstm,
    data_images,
    data_text,
    evaluators,
    lenet,
    minilm,
    resnet,
    smollm2,
    tasks,
)
