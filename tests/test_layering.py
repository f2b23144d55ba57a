"""The package's imports point one way: each unit imports only from units below it, at module level or
inside a function alike (a lazy import does not make a cycle acceptable)."""
import ast
from pathlib import Path

import mmgen_engine
import mmgen_engine.runtime as runtime
from mmgen_engine.config import BartConfig, BertConfig, GPT2Config
from mmgen_engine.models.bert import BertDecoder
from mmgen_engine.models.dalle_bart import BartDecoder
from mmgen_engine.models.gpt2 import GPT2Decoder

PACKAGE = Path(mmgen_engine.__file__).parent

# Bottom first. A unit is a top-level module or subpackage of mmgen_engine; a unit may import from
# the units of lower layers and from itself, never from its own layer's other units or above.
LAYERS = [
    {"errors", "gesture_format", "kernels", "_C"},
    {"files"},
    {"_native", "config"},
    {"checkpoint", "ops"},
    {"layers"},
    {"models", "runtime"},
    {"convert", "pipelines"},
    {"onnx"},
    {"training", "demo", "serving"},
    {"__init__"},
    {"cli"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir() or dotted == "mmgen_engine._C"


def _imports(path: Path, module: str, package: str):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            yield from subs or [target]
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _edges():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        package = module.removesuffix(".__init__") if rel.name == "__init__" else module.rsplit(".", 1)[0]
        module = module.removesuffix(".__init__")
        for target in _imports(path, module, package):
            if target.startswith("mmgen_engine") and _unit(target) != _unit(module):
                yield path.relative_to(PACKAGE.parent), _unit(module), _unit(target)


def test_every_unit_has_a_layer():
    units = {_unit(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert units - LAYER.keys() == set(), "give new units a layer in LAYERS"


def test_imports_point_down():
    upward = [f"{path}: {src} imports {dst}" for path, src, dst in _edges() if LAYER[dst] >= LAYER[src]]
    assert upward == []


def test_the_decoders_implement_the_runtime_protocol():
    gpt2 = GPT2Config(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8, max_positions=4)
    bert = BertConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8, max_positions=4)
    bart = BartConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, glu_size=8, max_positions=4)
    for decoder in (GPT2Decoder(gpt2, "meta"), BertDecoder(bert, "meta"), BartDecoder(bart, "meta")):
        assert isinstance(decoder, runtime.Decoder), type(decoder).__name__
        assert isinstance(decoder.uses_prefix, bool)
