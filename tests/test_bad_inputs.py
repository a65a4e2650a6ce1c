"""A table of hostile inputs across the public API and every adapter-file field.

Each case must raise a PeftliteError whose message names the argument (or the file and field) and must leave the
model exactly as it was (modules, values, requires_grad flags, hooks) and any adapter directory byte for byte.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftlite
from peftlite import PeftliteError
from tests.models import TinyMLP, assert_unchanged, snapshot, tiny_bert, tiny_llama

# ---- calls: (model factory, call(model, tmp_path), expected message) ----


def mlp():
    torch.manual_seed(0)
    return TinyMLP()


def injected():
    model = peftlite.inject(mlp(), rank=2)
    with torch.no_grad():
        for layer in peftlite.lora.lora_layers(model).values():
            layer.lora_B["default"].normal_()
    return model.eval()


def attention():
    return nn.Sequential(nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16))


def lora(**options):
    return lambda model, tmp: peftlite.inject(model, **options)


def adapter(**options):
    return lambda model, tmp: peftlite.inject(model, method="adapter", **{"targets": ["fc1"], **options})


def prefix(**options):
    return lambda model, tmp: peftlite.inject(model, method="prefix", **options)


def raising(name, module):
    raise KeyError(name)


def two_named():
    model = peftlite.inject(mlp(), rank=2, name="a")
    peftlite.inject(model, rank=3, targets=["fc1"], name="b")
    with torch.no_grad():
        for layer in peftlite.lora.lora_layers(model).values():
            for b in layer.lora_B.values():
                b.normal_()
    return model.eval()


def switched(model, name):
    peftlite.set_adapter(model, name)
    return model


def per_row_call(model, names, x):
    with peftlite.adapter_per_row(model, names):
        model(x)


def inside_disable(model, call):
    with peftlite.disable_adapters(model):
        call()


def inside_rows(model, call):
    with peftlite.adapter_per_row(model, ["a"]):
        call()


CALLS = {
    # inject, LoRA: every option, every wrong type or range
    "rank 0": (mlp, lora(rank=0), "rank=0"),
    "rank negative": (mlp, lora(rank=-3), "rank=-3"),
    "rank float": (mlp, lora(rank=2.0), "rank=2.0"),
    "rank bool": (mlp, lora(rank=True), "rank=True"),
    "rank string": (mlp, lora(rank="8"), "rank='8'"),
    "rank huge": (mlp, lora(rank=2**40), "rank=1099511627776: expected an integer from 1 to 65536"),
    "alpha 0": (mlp, lora(alpha=0), "alpha=0"),
    "alpha negative": (mlp, lora(alpha=-1.0), "alpha=-1.0"),
    "alpha nan": (mlp, lora(alpha=math.nan), "alpha=nan"),
    "alpha inf": (mlp, lora(alpha=math.inf), "alpha=inf"),
    "alpha 1e400": (mlp, lora(alpha=float("1e400")), "alpha=inf"),
    "alpha string": (mlp, lora(alpha="16"), "alpha='16'"),
    "alpha bool": (mlp, lora(alpha=True), "alpha=True"),
    "alpha complex": (mlp, lora(alpha=1j), "alpha=1j"),
    "dropout 1": (mlp, lora(dropout=1.0), "dropout=1.0"),
    "dropout negative": (mlp, lora(dropout=-0.1), "dropout=-0.1"),
    "dropout nan": (mlp, lora(dropout=math.nan), "dropout=nan"),
    "dropout string": (mlp, lora(dropout="0.1"), "dropout='0.1'"),
    "dropout bool": (mlp, lora(dropout=True), "dropout=True"),
    "rslora string": (mlp, lora(rslora="false"), "rslora='false'"),
    "rslora int": (mlp, lora(rslora=1), "rslora=1"),
    "rslora none": (mlp, lora(rslora=None), "rslora=None"),
    "init unknown": (mlp, lora(init="olora"), "init='olora'"),
    "init number": (mlp, lora(init=3), "init=3"),
    "name dotted": (mlp, lora(name="a.b"), "name='a.b'"),
    "name empty": (mlp, lora(name=""), "name=''"),
    "name space": (mlp, lora(name="a b"), "name='a b'"),
    "name number": (mlp, lora(name=7), "name=7"),
    "name none": (mlp, lora(name=None), "name=None"),
    "adapter_dtype int": (mlp, lora(adapter_dtype=torch.int8), "adapter_dtype=torch.int8"),
    "adapter_dtype complex": (mlp, lora(adapter_dtype=torch.complex64), "adapter_dtype=torch.complex64"),
    "adapter_dtype float8": (mlp, lora(adapter_dtype=torch.float8_e4m3fn), "adapter_dtype=torch.float8_e4m3fn"),
    "adapter_dtype string": (mlp, lora(adapter_dtype="float32"), "adapter_dtype='float32'"),
    "targets empty list": (mlp, lora(targets=[]), "targets=\\[\\]"),
    "targets bad regex": (mlp, lora(targets="("), "targets='\\(' is not a valid regular expression"),
    "targets number": (mlp, lora(targets=3), "targets=3"),
    "targets mixed list": (mlp, lora(targets=["fc1", 4]), "targets=\\['fc1', 4\\]"),
    "targets none in list": (mlp, lora(targets=[None]), "targets=\\[None\\]"),
    "targets dict": (mlp, lora(targets={"fc1": 1}), "targets=\\{'fc1': 1\\}"),
    "targets typo": (mlp, lora(targets=["fc11"]), "targets entry 'fc11' matched no module.*fc1"),
    "targets regex no match": (mlp, lora(targets="fc"), "targets entry 'fc' matched no module"),
    "targets callable raises": (mlp, lora(targets=raising), "targets callable .* raised KeyError"),
    "targets callable says 'False'": (mlp, lora(targets=lambda n, m: "False"), "returned 'False'"),
    "targets callable returns 1": (mlp, lora(targets=lambda n, m: 1), "returned 1"),
    "targets callable none": (mlp, lora(targets=lambda n, m: False), "targets entry <function .* matched no"),
    "targets a norm": (mlp, lora(targets=["norm"]), "'norm' is a LayerNorm, which LoRA does not support"),
    "targets a good layer then a norm": (mlp, lora(targets=["fc1", "norm"]), "'norm' is a LayerNorm"),
    "targets good layers then a bad rank pattern": (mlp, lora(targets=["fc1", "fc2"], rank=0), "rank=0"),
    "targets a container": (tiny_llama, lora(targets=["mlp"]), "LlamaMLP, which LoRA does not support"),
    "targets mha out_proj": (attention, lora(targets=["out_proj"]), "belongs to an nn.MultiheadAttention"),
    "targets mha itself": (attention, lora(targets=["self_attn"]), "MultiheadAttention, which LoRA does not"),
    "exclude everything": (mlp, lora(exclude=["fc1", "fc2"]), "left no layer to adapt"),
    "exclude typo": (mlp, lora(exclude=["fc3"]), "exclude entry 'fc3' matched no module"),
    "exclude bad regex": (mlp, lora(exclude="["), "exclude='\\[' is not a valid regular expression"),
    "exclude number": (mlp, lora(exclude=5), "exclude=5"),
    "exclude callable says 'True'": (mlp, lora(exclude=lambda n, m: "True"), "exclude callable .* returned 'True'"),
    "trainable string": (mlp, lora(trainable="head"), "trainable='head'"),
    "trainable number in list": (mlp, lora(trainable=[3]), "trainable=\\[3\\]"),
    "trainable typo": (mlp, lora(trainable=["haed"]), "trainable entry 'haed' matched no module"),
    "trainable no parameters": (lambda: nn.Sequential(nn.Linear(3, 3), nn.ReLU()), lora(targets=["0"],
                                trainable=["1"]), "trainable entry '1' \\(ReLU\\) has no parameters"),
    "trainable also a target": (mlp, lora(targets=["fc1", "head"], trainable=["head"]), "'head' is a trained head"),
    "unknown option": (mlp, lora(rank=2, foo=1), "unknown option\\(s\\) foo"),
    "unknown options": (mlp, lora(lr=1, bias="all"), "unknown option\\(s\\) bias, lr"),
    "method unknown": (mlp, lora(method="dora"), "method='dora'"),
    "method number": (mlp, lora(method=1), "method=1"),
    "rank with adapter": (mlp, lora(method="adapter", rank=4, targets=["fc1"]), "rank=4 applies to method='lora'"),
    "rank with prefix": (mlp, lora(method="prefix", rank=4), "rank=4 applies to method='lora'"),
    "model a list": (mlp, lambda m, t: peftlite.inject([m]), "expected a torch.nn.Module, got list"),
    "model a string": (mlp, lambda m, t: peftlite.inject("model"), "expected a torch.nn.Module, got str"),
    "model none": (mlp, lambda m, t: peftlite.inject(None), "expected a torch.nn.Module, got NoneType"),
    "twice same name": (injected, lora(rank=2), "already has a LoRA adapter named 'default'"),
    "conv groups": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), lora(targets=["0"]), "groups=4"),
    "embedding max_norm": (lambda: nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), lora(targets=["0"]),
                           "max_norm=1.0"),
    "int weight": (lambda: nn.Sequential(int_linear()), lora(targets=["0"]), "weight has dtype torch.int32; LoRA needs a floating-point weight"),
    "float8 weight": (lambda: nn.Sequential(float8_linear()), lora(targets=["0"]),
                      "dtype torch.float8_e4m3fn; LoRA supports float32, float64, float16 and bfloat16"),
    "complex weight": (lambda: nn.Sequential(nn.Linear(3, 3, dtype=torch.complex64)), lora(targets=["0"]),
                       "dtype torch.complex64; LoRA needs a floating-point weight"),
    "parametrized": (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))),
                     lora(targets=["0"]), "computed by torch.nn.utils.parametrize"),
    "conv transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 3, 2)), lora(targets=["0"]),
                       "ConvTranspose2d, which LoRA does not support"),
    # inject, bottleneck adapters
    "adapter no targets": (mlp, lambda m, t: peftlite.inject(m, method="adapter"), "needs targets"),
    "adapter dim 0": (mlp, adapter(dim=0), "dim=0"),
    "adapter dim string": (mlp, adapter(dim="24"), "dim='24'"),
    "adapter dim mismatch": (mlp, adapter(dim=7), "dim=7 does not match the Linear"),
    "adapter dim huge": (mlp, adapter(dim=2**20), "dim=1048576: expected an integer from 1 to 65536"),
    "adapter bottleneck 0": (mlp, adapter(bottleneck=0), "bottleneck=0"),
    "adapter bottleneck bool": (mlp, adapter(bottleneck=True), "bottleneck=True"),
    "adapter reduction 0": (mlp, adapter(reduction_factor=0), "reduction_factor=0"),
    "adapter reduction nan": (mlp, adapter(reduction_factor=math.nan), "reduction_factor=nan"),
    "adapter reduction inf": (mlp, adapter(reduction_factor=math.inf), "reduction_factor=inf"),
    "adapter reduction string": (mlp, adapter(reduction_factor="16"), "reduction_factor='16'"),
    "adapter reduction too big": (mlp, adapter(reduction_factor=1000), "reduction_factor 1000 is 0"),
    "adapter activation": (mlp, adapter(activation="softmax"), "activation='softmax'"),
    "adapter activation number": (mlp, adapter(activation=1), "activation=1"),
    "adapter activation unhashable": (mlp, adapter(activation=["relu"]), "activation=\\['relu'\\]"),
    "adapter mode unhashable": (mlp, adapter(mode={"a": 1}), "mode=\\{'a': 1\\}"),
    "adapter mode": (mlp, adapter(mode="serial"), "mode='serial'"),
    "adapter parallel mismatch": (mlp, adapter(mode="parallel"), "parallel adapter adds a function of the input"),
    "adapter scaling nan": (mlp, adapter(scaling=math.nan), "scaling=nan"),
    "adapter scaling inf": (mlp, adapter(scaling=math.inf), "scaling=inf"),
    "adapter scaling string": (mlp, adapter(scaling="big"), "scaling='big'"),
    "adapter scaling bool": (mlp, adapter(scaling=True), "scaling=True"),
    "adapter dropout": (mlp, adapter(dropout=1), "dropout=1"),
    "adapter init": (mlp, adapter(init="xavier"), "init='xavier'"),
    "adapter name": (mlp, adapter(name="x.y"), "name='x.y'"),
    "adapter mha internal": (attention, lambda m, t: peftlite.inject(m, method="adapter", targets=["out_proj"]),
                             "belongs to an nn.MultiheadAttention"),
    "adapter on a trained head": (tiny_bert, lambda m, t: peftlite.inject(m, method="adapter", targets=["classifier"]),
                                  "'classifier' is .inside. a trained head"),
    "adapter twice": (lambda: peftlite.inject(mlp(), method="adapter", targets=["fc1"]), adapter(),
                      "already has a bottleneck adapter named 'default'"),
    "adapter second name other mode": (lambda: peftlite.inject(mlp(), method="adapter", targets=["fc1"]),
                                       adapter(name="b", mode="parallel"), "same mode"),
    "adapter unknown dim": (lambda: nn.Sequential(nn.ReLU(), nn.Linear(3, 3)),
                            lambda m, t: peftlite.inject(m, method="adapter", targets=["0"]),
                            "cannot infer the feature size of a ReLU"),
    # inject, prefix
    "prefix_len 0": (tiny_llama, prefix(prefix_len=0), "prefix_len=0"),
    "prefix_len float": (tiny_llama, prefix(prefix_len=2.5), "prefix_len=2.5"),
    "prefix_len bool": (tiny_llama, prefix(prefix_len=True), "prefix_len=True"),
    "prefix_len huge": (tiny_llama, prefix(prefix_len=10**12), "prefix_len=1000000000000: expected an integer"),
    "projection_dim 0": (tiny_llama, prefix(projection_dim=0), "projection_dim=0"),
    "projection_dim string": (tiny_llama, prefix(projection_dim="512"), "projection_dim='512'"),
    "prefix name": (tiny_llama, prefix(name="a.b"), "name='a.b'"),
    "prefix no attention": (mlp, prefix(), "found no attention module"),
    "prefix twice": (lambda: peftlite.inject(tiny_llama(), method="prefix", prefix_len=2), prefix(),
                     "already has a prefix"),
    "prefix on sequential": (lambda: nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16)), prefix(),
                             "would become a layer of this nn.Sequential"),
    # LoRALinear, Adapter, PrefixEncoder constructors
    "LoRALinear of a conv": (mlp, lambda m, t: peftlite.LoRALinear(nn.Conv2d(3, 3, 1)), "LoRALinear adapts an "
                             "nn.Linear, got Conv2d"),
    "LoRALinear of a string": (mlp, lambda m, t: peftlite.LoRALinear("fc1"), "got str"),
    "LoRALinear twice": (injected, lambda m, t: peftlite.LoRALinear(m.fc1), "already has LoRA"),
    "LoRALinear rank": (mlp, lambda m, t: peftlite.LoRALinear(m.fc1, rank=0), "rank=0"),
    "LoRALinear alpha": (mlp, lambda m, t: peftlite.LoRALinear(m.fc1, alpha=-2), "alpha=-2"),
    "LoRALinear name": (mlp, lambda m, t: peftlite.LoRALinear(m.fc1, name="x.y"), "name='x.y'"),
    "Adapter of a string": (mlp, lambda m, t: peftlite.Adapter("fc1"), "Adapter needs an nn.Module to wrap"),
    "Adapter dim": (mlp, lambda m, t: peftlite.Adapter(m.fc1, dim=5), "dim=5 does not match"),
    "PrefixEncoder layers": (mlp, lambda m, t: peftlite.PrefixEncoder(0, 2, 4), "num_layers=0"),
    "PrefixEncoder heads": (mlp, lambda m, t: peftlite.PrefixEncoder(1, "2", 4), "num_heads='2'"),
    "PrefixEncoder head_dim": (mlp, lambda m, t: peftlite.PrefixEncoder(1, 2, -4), "head_dim=-4"),
    "PrefixEncoder huge": (mlp, lambda m, t: peftlite.PrefixEncoder(1, 2, 4, prefix_len=10**9), "prefix_len="),
    # merge / unmerge / unload
    "merge nothing": (mlp, lambda m, t: peftlite.merge(m), "merge: the model has no LoRA layers"),
    "unmerge nothing": (mlp, lambda m, t: peftlite.unmerge(m), "unmerge: the model has no LoRA layers"),
    "unload nothing": (mlp, lambda m, t: peftlite.unload(m), "unload: the model has no LoRA layers"),
    "merge a string": (mlp, lambda m, t: peftlite.merge("m"), "expected a torch.nn.Module"),
    "unload merge string": (injected, lambda m, t: peftlite.unload(m, merge="no"), "merge='no'"),
    "unload merge int": (injected, lambda m, t: peftlite.unload(m, merge=0), "merge=0"),
    "merge only adapters": (lambda: peftlite.inject(mlp(), method="adapter", targets=["fc1"]),
                            lambda m, t: peftlite.merge(m), "cannot be merged into weights"),
    "merge nan adapter": (lambda: nan_adapter(injected()), lambda m, t: peftlite.merge(m), "gives NaN or Inf"),
    "merge tied": (lambda: tied(), lambda m, t: peftlite.merge(m), "shared with"),
    "merge subclass": (lambda: subclass(), lambda m, t: peftlite.merge(m), "a Linear subclass with its own"),
    "unmerge after data edit": (lambda: edited_while_merged("weight"), lambda m, t: peftlite.unmerge(m),
                                "changed while merged"),
    "unmerge after adapter edit": (lambda: edited_while_merged("lora_B"), lambda m, t: peftlite.unmerge(m),
                                   "changed while merged"),
    "unmerge after dtype round trip": (lambda: edited_while_merged("dtype"), lambda m, t: peftlite.unmerge(m),
                                       "changed while merged"),
    "train merged": (lambda: merged(injected()).train(), lambda m, t: m(torch.randn(2, 12)),
                     "forward in training mode on a merged LoRA layer"),
    "merge meta": (lambda: meta(injected()), lambda m, t: peftlite.merge(m), "merge: parameter .* meta device"),
    # save_adapter
    "save a string": (injected, lambda m, t: peftlite.save_adapter("m", t / "out"), "expected a torch.nn.Module"),
    "save path number": (injected, lambda m, t: peftlite.save_adapter(m, 3), "directory=3"),
    "save path none": (injected, lambda m, t: peftlite.save_adapter(m, None), "directory=None"),
    "save method": (injected, lambda m, t: peftlite.save_adapter(m, t / "out", method="ia3"), "method='ia3'"),
    "save absent method": (injected, lambda m, t: peftlite.save_adapter(m, t / "out", method="prefix"),
                           "method='prefix': the model has no such adapter"),
    "save name": (injected, lambda m, t: peftlite.save_adapter(m, t / "out", name="other"),
                  "the model has no adapter named 'other'"),
    "save bad name": (injected, lambda m, t: peftlite.save_adapter(m, t / "out", name="a/b"), "name='a/b'"),
    "save nothing": (mlp, lambda m, t: peftlite.save_adapter(m, t / "out"), "save_adapter: the model has no LoRA"),
    "save into a file": (injected, lambda m, t: peftlite.save_adapter(m, a_file(t)), "could not write the adapter"),
    "save below a file": (injected, lambda m, t: peftlite.save_adapter(m, a_file(t) / "x"),
                          "could not write the adapter"),
    "save mixed dropout": (lambda: mixed_dropout(), lambda m, t: peftlite.save_adapter(m, t / "out"),
                           "holds one lora_dropout"),
    "save trainable base": (lambda: trainable_base(), lambda m, t: peftlite.save_adapter(m, t / "out"),
                            "base weight or bias of LoRA layer 'fc1' is trainable"),
    "save two methods": (lambda: peftlite.inject(injected(), method="adapter", targets=["fc1"]),
                         lambda m, t: peftlite.save_adapter(m, t / "out"), "a directory holds one method"),
    "save meta": (lambda: meta(injected()), lambda m, t: peftlite.save_adapter(m, t / "out"),
                  "save_adapter: parameter .* meta device"),
    # load_adapter arguments
    "load a string": (mlp, lambda m, t: peftlite.load_adapter("m", saved(t)), "expected a torch.nn.Module"),
    "load path number": (mlp, lambda m, t: peftlite.load_adapter(m, 3), "directory=3"),
    "load missing dir": (mlp, lambda m, t: peftlite.load_adapter(m, t / "nope"), "adapter_config.json: no such"),
    "load name": (mlp, lambda m, t: peftlite.load_adapter(m, saved(t), name="a.b"), "name='a.b'"),
    "load meta": (lambda: meta(mlp()), lambda m, t: peftlite.load_adapter(m, saved(t)),
                  "load_adapter: parameter .* meta device"),
    "load into other model": (tiny_llama, lambda m, t: peftlite.load_adapter(m, saved(t)), "the model has no module"),
    "load over other rank": (lambda: peftlite.inject(mlp(), rank=3), lambda m, t: peftlite.load_adapter(m, saved(t)),
                             "already has adapter 'default' of rank 3, the file has rank 2"),
    "load over merged": (lambda: merged(injected()), lambda m, t: peftlite.load_adapter(m, saved(t)), "is merged"),
    # named adapters
    "set_adapter unknown": (two_named, lambda m, t: peftlite.set_adapter(m, "c"), "'c' is not an adapter"),
    "set_adapter none": (two_named, lambda m, t: peftlite.set_adapter(m, None), "names=None"),
    "set_adapter empty": (two_named, lambda m, t: peftlite.set_adapter(m, []), "non-empty list"),
    "set_adapter twice": (two_named, lambda m, t: peftlite.set_adapter(m, ["a", "a"]), "lists an adapter twice"),
    "set_adapter int": (two_named, lambda m, t: peftlite.set_adapter(m, [1]), "1 is not an adapter"),
    "set_adapter merged": (lambda: merged(two_named()), lambda m, t: peftlite.set_adapter(m, "a"), "holds merged"),
    "set_adapter no adapters": (mlp, lambda m, t: peftlite.set_adapter(m, "a"), "set_adapter: the model has no"),
    "set_adapter leaves prefix out": (lambda: peftlite.inject(peftlite.inject(tiny_llama(), rank=2, name="a"),
                                                              method="prefix", name="p"),
                                      lambda m, t: peftlite.set_adapter(m, "a"), "prefix 'p' is always on"),
    "disable with prefix": (lambda: peftlite.inject(tiny_llama(), method="prefix"),
                            lambda m, t: peftlite.disable_adapters(m).__enter__(), "cannot be switched off"),
    "disable nothing": (mlp, lambda m, t: peftlite.disable_adapters(m).__enter__(), "disable_adapters: the model"),
    "disable edited merged": (lambda: edited_while_merged("weight"),
                              lambda m, t: peftlite.disable_adapters(m).__enter__(), "changed while merged"),
    "per-row unknown": (two_named, lambda m, t: peftlite.adapter_per_row(m, ["a", "z"]).__enter__(),
                        "'z' is not an adapter"),
    "per-row string": (two_named, lambda m, t: peftlite.adapter_per_row(m, 5).__enter__(), "names=5"),
    "per-row merged": (lambda: merged(two_named()), lambda m, t: peftlite.adapter_per_row(m, ["a"]).__enter__(),
                       "holds merged"),
    "per-row prefix": (lambda: peftlite.inject(tiny_llama(), method="prefix", name="p"),
                       lambda m, t: peftlite.adapter_per_row(m, ["p"]).__enter__(), "'p' is a prefix"),
    "per-row wrong batch": (two_named, lambda m, t: per_row_call(m, ["a", "b", None], torch.randn(2, 12)),
                            "3 names \\(one per row\\) for a batch of 2 rows"),
    "per-row fewer names than rows": (two_named, lambda m, t: per_row_call(m, ["a", "b"], torch.randn(4, 12)),
                                      "2 names \\(one per row\\) for a batch of 4 rows"),
    "per-row fewer names, 3-D": (two_named, lambda m, t: per_row_call(m, ["a", "b"], torch.randn(4, 3, 12)),
                                 "2 names \\(one per row\\) for a batch of 4 rows"),
    "per-row layer sees a multiple": (lambda: two_named_on(Regroup(), ["fc1"]),
                                      lambda m, t: per_row_call(m, ["a", "b"], torch.randn(2, 6, 12)),
                                      "a per-row batch of 2 rows .* input has shape \\(4, 3, 12\\)"),
    "per-row sequence-first": (lambda: two_named_on(nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16)), ["linear1"]),
                               lambda m, t: per_row_call(m, ["a", "b"], torch.randn(4, 2, 8)),
                               "'0' \\(TransformerEncoderLayer\\) takes sequence-first inputs"),
    "delete unknown": (two_named, lambda m, t: peftlite.delete_adapter(m, "c"), "'c' is not an adapter"),
    "delete list": (two_named, lambda m, t: peftlite.delete_adapter(m, ["a"]), "expected one adapter name"),
    "delete merged": (lambda: merged(two_named()), lambda m, t: peftlite.delete_adapter(m, "a"), "holds merged"),
    "merge names unknown": (two_named, lambda m, t: peftlite.merge(m, names=["c"]), "no LoRA adapter named 'c'"),
    "merge names type": (two_named, lambda m, t: peftlite.merge(m, names=5), "names=5"),
    "merge names inactive": (lambda: switched(two_named(), "b"), lambda m, t: peftlite.merge(m, names="a"),
                             "adapter 'a' is not active"),
    "merge nothing active": (lambda: switched(peftlite.inject(injected(), method="adapter", targets=["fc1"],
                                                              name="bn"), "bn"),
                             lambda m, t: peftlite.merge(m), "no LoRA adapter is active"),
    "unmerge names unknown": (lambda: merged(two_named()), lambda m, t: peftlite.unmerge(m, names=["c"]),
                              "names=\\['c'\\]"),
    "unload names without merge": (two_named, lambda m, t: peftlite.unload(m, merge=False, names=["a"]),
                                   "with merge=False every adapter is dropped"),
    "combine unknown": (two_named, lambda m, t: peftlite.combine_adapters(m, {"z": 1.0}, name="c"),
                        "'z' is not a LoRA adapter"),
    "combine taken name": (two_named, lambda m, t: peftlite.combine_adapters(m, {"a": 1.0}, name="b"), "is taken"),
    "combine bad name": (two_named, lambda m, t: peftlite.combine_adapters(m, {"a": 1.0}, name="c.d"), "name='c.d'"),
    "combine inf weight": (two_named, lambda m, t: peftlite.combine_adapters(m, {"a": math.inf}, name="c"),
                           "weight of 'a' is inf"),
    "combine how": (two_named, lambda m, t: peftlite.combine_adapters(m, {"a": 1.0}, name="c", how="magnitude"),
                    "how='magnitude'"),
    "combine rank": (two_named, lambda m, t: peftlite.combine_adapters(m, {"a": 1.0}, name="c", how="svd", rank=0),
                     "rank=0"),
    "combine seed": (two_named, lambda m, t: peftlite.combine_adapters(m, {"a": 1.0}, name="c", how="dare",
                                                                        seed=1.5), "seed=1.5"),
    "combine merged": (lambda: merged(two_named()), lambda m, t: peftlite.combine_adapters(m, {"a": 1.0}, name="c"),
                       "holds merged"),
    "inject inside disable": (two_named, lambda m, t: inside_disable(m, lambda: peftlite.inject(m, rank=2, name="c")),
                              "inject inside peftlite.disable_adapters"),
    "load inside per-row": (two_named, lambda m, t: inside_rows(m, lambda: peftlite.load_adapter(m, saved(t))),
                            "load_adapter inside peftlite.adapter_per_row"),
    "save name of two": (two_named, lambda m, t: peftlite.save_adapter(m, t / "out", name="z"),
                         "no adapter named 'z'; its adapters are \\['a', 'b'\\]"),
    "hot swap wider": (lambda: peftlite.inject(mlp(), rank=2, targets=["fc1"]),
                       lambda m, t: peftlite.load_adapter(m, saved(t)), "also adapts 'fc2'"),
}


class Regroup(nn.Module):
    """Regroups its [B, 2k, d] input as [2B, k, d] before its layer: the layer's leading axis is not the batch."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc1(x.reshape(-1, 3, 12))


def two_named_on(model, targets):
    peftlite.inject(model, rank=2, targets=targets, name="a")
    peftlite.inject(model, rank=2, targets=targets, name="b")
    with torch.no_grad():
        for layer in peftlite.lora.lora_layers(model).values():
            for b in layer.lora_B.values():
                b.normal_()
    return model.eval()


RESERVED_NAMES = ["forward", "to", "state_dict", "training", "__class__", "_parameters", "cuda", "train", "keys"]
CALLS.update({f"name {n}": (mlp, lora(name=n), f"name='{n}' is the name of a torch module attribute")
              for n in RESERVED_NAMES})
CALLS.update({
    "name forward, second adapter": (injected, lora(name="forward"), "name='forward' is the name of a torch module"),
    "adapter name training": (mlp, adapter(name="training"), "name='training' is the name of a torch module"),
    "adapter name to, second": (lambda: peftlite.inject(mlp(), method="adapter", targets=["fc1"]),
                                adapter(name="to"), "name='to' is the name of a torch module"),
    "prefix name train": (tiny_llama, prefix(name="train"), "name='train' is the name of a torch module"),
    "combine name state_dict": (two_named, lambda m, t: peftlite.combine_adapters(m, {"a": 1.0}, name="state_dict"),
                                "name='state_dict' is the name of a torch module"),
    "load name _parameters": (mlp, lambda m, t: peftlite.load_adapter(m, saved(t), name="_parameters"),
                              "name='_parameters' is the name of a torch module"),
    "load subfolder named training": (mlp, lambda m, t: peftlite.load_adapter(m, subfolder(t, "training")),
                                      "folder name cannot be an adapter name .*name='training'"),
    "save name cuda": (injected, lambda m, t: peftlite.save_adapter(m, t / "out", name="cuda"),
                       "name='cuda' is the name of a torch module"),
})

CALLS.update({
    "inject a PEFT model": (lambda: peft_model(mlp()), lora(rank=2), "holds HF PEFT's .*merge_and_unload"),
    "inject PEFT's base model": (lambda: peft_model(mlp()).get_base_model(), lora(rank=2, targets=["fc1"]),
                                 "holds HF PEFT's Linear at 'fc1'"),
    "load onto a PEFT model": (lambda: peft_model(mlp()), lambda m, t: peftlite.load_adapter(m, saved(t)),
                               "load_adapter: the model holds HF PEFT's"),
})

CALLS.update({
    "save two over one": (two_named, lambda m, t: peftlite.save_adapter(m, saved(t)),
                          "already holds adapter\\(s\\) \\(root\\) from an earlier save"),
    "save one over a subfolder": (injected, lambda m, t: peftlite.save_adapter(m, subfolder(t, "training")),
                                  "already holds adapter\\(s\\) 'training' from an earlier save"),
    "save NaN adapter": (lambda: nan_adapter(injected()), lambda m, t: peftlite.save_adapter(m, t / "out"),
                         "'base_model.model.fc1.lora_B.weight' holds NaN or Inf values; the run diverged"),
    "save Inf trained head": (lambda: inf_head(peftlite.inject(mlp(), rank=2, trainable=["head"])),
                              lambda m, t: peftlite.save_adapter(m, t / "out"), "head.weight' holds NaN or Inf"),
})

CALLS.update({
    "merge tied by storage": (lambda: peftlite.inject(tied_by_storage(), rank=2, targets=["0", "1"]),
                              lambda m, t: peftlite.merge(m), "weight of LoRA layer '0' is shared with '1.weight'"),
    "unload tied by storage": (lambda: peftlite.inject(tied_by_storage(), rank=2, targets=["0", "1"]),
                               lambda m, t: peftlite.unload(m), "weight of LoRA layer '0' is shared with '1.weight'"),
})

CALLS.update({
    "alpha int 10**400": (mlp, lora(alpha=10**400), "alpha=10000000000000000000000000000000000000000"),
    "alpha 1e308": (mlp, lora(alpha=1e308), "alpha=1e\\+308: expected a finite number > 0 and at most"),
    "combine weight 1e300": (two_named, lambda m, t: peftlite.combine_adapters(m, {"a": 1e300, "b": 1.0}, name="c"),
                             "the weight of 'a' is 1e\\+300"),
    "combine weight 10**400": (two_named, lambda m, t: peftlite.combine_adapters(m, {"a": 10**400}, name="c",
                                                                                 how="svd"), "the weight of 'a'"),
    "combine overflows fp16": (lambda: half_named(), lambda m, t: peftlite.combine_adapters(
        m, {"a": 2.0**23, "b": 1.0}, name="c", how="cat"), "holds NaN or Inf in torch.float16"),
    "adapter reduction 1e-30": (mlp, adapter(reduction_factor=1e-30), "reduction_factor 1e-30 is .*the bottleneck "
                                "needs 1 to 65536"),
    "adapter reduction 1e-30, second": (lambda: peftlite.inject(mlp(), method="adapter", targets=["fc1"]),
                                        adapter(reduction_factor=1e-30, name="b"), "reduction_factor 1e-30"),
    "adapter scaling huge": (mlp, adapter(scaling=1e300), "scaling=1e\\+300"),
})

CALLS.update({
    "LoRALinear no layer": (mlp, lambda m, t: peftlite.LoRALinear(), "adapts the nn.Linear it is given; got none"),
    "LoRALinear None": (mlp, lambda m, t: peftlite.LoRALinear(None, rank=2), "got none"),
    "LoRALinear empty": (mlp, lambda m, t: peftlite.LoRALinear(nn.Linear(0, 4)), "empty weight \\(4, 0\\)"),
    "inject an empty Linear": (lambda: nn.Sequential(nn.Linear(3, 0)), lora(targets=["0"]), "'0' has an empty weight"),
    "PrefixEncoder layer float": (mlp, lambda m, t: peftlite.PrefixEncoder(1, 2, 4)(0.5), "layer=0.5"),
    "PrefixEncoder layer bool": (mlp, lambda m, t: peftlite.PrefixEncoder(2, 2, 4)(True), "layer=True"),
})



def shared_pair():
    model = mlp()
    model.alias = model.fc1  # one module, two paths
    return model


def shared_bottleneck_file(tmp):
    """A bottleneck file (written before the snapshot, by saved()) naming fc1 and its alias."""
    return tmp / "shared"


CALLS["bottleneck file names a shared module twice"] = (
    shared_pair, lambda m, t: peftlite.load_adapter(m, shared_bottleneck_file(t)), "which are one module \\(shared\\)")

CALLS.update({
    "enable_input_require_grads string": (mlp, lambda m, t: peftlite.enable_input_require_grads("model"),
                                          "expected a torch.nn.Module, got str"),
    "enable_input_require_grads none": (mlp, lambda m, t: peftlite.enable_input_require_grads(None),
                                        "expected a torch.nn.Module, got NoneType"),
    "enable_input_require_grads no frozen embedding": (injected, lambda m, t: peftlite.enable_input_require_grads(m),
                                                       "no frozen nn.Embedding"),
    "enable_input_require_grads trainable embedding": (
        lambda: nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 3)),
        lambda m, t: peftlite.enable_input_require_grads(m), "no frozen nn.Embedding"),
    "check_gradients a string": (mlp, lambda m, t: peftlite.check_gradients("model"), "got str"),
})


def half_named():
    model = two_named()
    for layer in peftlite.lora.lora_layers(model).values():
        for name in layer.lora_settings:
            layer.lora_A[name].data = layer.lora_A[name].data.half() * 100
            layer.lora_B[name].data = layer.lora_B[name].data.half() * 100
    return model


def tied_by_storage():
    """Two Parameter objects over one storage: what load_state_dict(assign=True) of a tied state dict leaves."""
    source = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    source[1].weight = source[0].weight
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model.load_state_dict(source.state_dict(), assign=True)
    assert model[0].weight is not model[1].weight
    assert model[0].weight.data_ptr() == model[1].weight.data_ptr()
    return model


def inf_head(model):
    with torch.no_grad():
        model.head.weight[0, 0] = math.inf
    return model


def peft_model(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=["fc1", "fc2"]))


def subfolder(tmp, name):
    """A directory holding a valid adapter in subfolder ``name`` (as PEFT lays out a second adapter; saved())."""
    assert (tmp / "multi" / name).is_dir()
    return tmp / "multi"


def int_linear():
    layer = nn.Linear(3, 3)
    layer.weight = nn.Parameter(torch.ones(3, 3, dtype=torch.int32), requires_grad=False)
    return layer


def float8_linear():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    return layer


def nan_adapter(model):
    with torch.no_grad():
        model.fc1.lora_B["default"].fill_(math.nan)
    return model


def tied():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    return peftlite.inject(model, rank=2, targets=["0", "1"])


class Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def subclass():
    return peftlite.inject(nn.Sequential(Scaled(3, 3)), rank=2, targets=["0"])


def merged(model):
    peftlite.merge(model.eval())
    return model


def edited_while_merged(what):
    model = merged(injected())
    if what == "weight":
        model.fc1.weight.data.add_(1)
    elif what == "lora_B":
        model.fc1.lora_B["default"].data.mul_(2)
    else:
        model.bfloat16().float()
    return model


def meta(model):
    return model.to("meta")


def mixed_dropout():
    return peftlite.inject(peftlite.inject(mlp(), rank=2, targets=["fc1"]), rank=2, targets=["fc2"], dropout=0.1)


def trainable_base():
    model = injected()
    model.fc1.weight.requires_grad_(True)
    return model


def a_file(tmp):
    return tmp / "a_file"  # written by saved()


def saved(tmp):
    """A valid LoRA adapter of TinyMLP (rank 2 on fc1, fc2) in ``tmp/saved``."""
    directory = tmp / "saved"
    if not directory.exists():
        peftlite.save_adapter(injected(), directory)
        (tmp / "a_file").write_text("not a directory")
        shutil.copytree(directory, tmp / "multi" / "training")
        source = peftlite.inject(mlp(), method="adapter", targets=["fc1"], reduction_factor=8)
        peftlite.save_adapter(source, tmp / "shared")
        config = json.loads((tmp / "shared" / "adapter_config.json").read_text())
        config["modules"]["alias"] = config["modules"]["fc1"]
        (tmp / "shared" / "adapter_config.json").write_text(json.dumps(config))
        tensors = load_file(tmp / "shared" / "adapter_model.safetensors")
        tensors.update({k.replace(".fc1.", ".alias."): v.clone() for k, v in tensors.items()})
        save_file(tensors, tmp / "shared" / "adapter_model.safetensors")
    return directory


def directory_state(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CALLS))
def test_bad_call_raises_a_clear_error_and_changes_nothing(case, tmp_path):
    build, call, match = CALLS[case]
    model = build()
    saved(tmp_path)
    before, files = snapshot(model), directory_state(tmp_path)
    with pytest.raises(PeftliteError, match=match):
        call(model, tmp_path)
    assert_unchanged(model, before)
    assert directory_state(tmp_path) == files


# ---- files: (which adapter, edit(directory), expected message) ----

def config_edit(**changes):
    def edit(directory):
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def config_drop(key):
    def edit(directory):
        path = directory / "adapter_config.json"
        config = json.loads(path.read_text())
        del config[key]
        path.write_text(json.dumps(config))
    return edit


def config_text(text):
    return lambda directory: (directory / "adapter_config.json").write_text(text)


def weights_edit(change):
    def edit(directory):
        from safetensors.torch import load_file
        path = directory / "adapter_model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return edit


def weights_bytes(data):
    return lambda directory: (directory / "adapter_model.safetensors").write_bytes(data)


def truncate(directory):
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-7])


A = "base_model.model.fc1.lora_A.weight"
B = "base_model.model.fc1.lora_B.weight"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def put(key, value):
    return weights_edit(lambda t: t.__setitem__(key, value))


FILES = {
    "peft_type missing": ("lora", config_drop("peft_type"), f"{CONFIG}: peft_type is None"),
    "peft_type unknown": ("lora", config_edit(peft_type="IA3"), "peft_type is 'IA3'"),
    "peft_type number": ("lora", config_edit(peft_type=3), "peft_type is 3"),
    "r 0": ("lora", config_edit(r=0), f"{CONFIG}: rank=0"),
    "r negative": ("lora", config_edit(r=-2), f"{CONFIG}: rank=-2"),
    "r string": ("lora", config_edit(r="2"), f"{CONFIG}: rank='2'"),
    "r float": ("lora", config_edit(r=2.5), f"{CONFIG}: rank=2.5"),
    "r bool": ("lora", config_edit(r=True), f"{CONFIG}: rank=True"),
    "r null": ("lora", config_edit(r=None), f"{CONFIG}: rank=None"),
    "r mismatch": ("lora", config_edit(r=3), "shape mismatch for layer 'fc[12]'"),
    "lora_alpha 0": ("lora", config_edit(lora_alpha=0), f"{CONFIG}: alpha=0"),
    "lora_alpha negative": ("lora", config_edit(lora_alpha=-8), f"{CONFIG}: alpha=-8"),
    "lora_alpha string": ("lora", config_edit(lora_alpha="8"), f"{CONFIG}: alpha='8'"),
    "lora_alpha bool": ("lora", config_edit(lora_alpha=True), f"{CONFIG}: alpha=True"),
    "lora_alpha Infinity": ("lora", config_text('{"peft_type": "LORA", "r": 2, "lora_alpha": Infinity}'),
                            f"{CONFIG}: alpha=inf"),
    "lora_alpha 1e400": ("lora", config_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 1e400}'),
                         f"{CONFIG}: alpha=inf"),
    "lora_alpha NaN": ("lora", config_text('{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}'),
                       f"{CONFIG}: alpha=nan"),
    "lora_dropout 1": ("lora", config_edit(lora_dropout=1), f"{CONFIG}: dropout=1"),
    "lora_dropout negative": ("lora", config_edit(lora_dropout=-0.5), f"{CONFIG}: dropout=-0.5"),
    "lora_dropout string": ("lora", config_edit(lora_dropout="0"), f"{CONFIG}: dropout='0'"),
    "use_rslora string": ("lora", config_edit(use_rslora="false"), f"{CONFIG}: rslora='false'"),
    "use_rslora number": ("lora", config_edit(use_rslora=0), f"{CONFIG}: rslora=0"),
    "fan_in_fan_out string": ("lora", config_edit(fan_in_fan_out="no"), "fan_in_fan_out='no'"),
    "fan_in_fan_out contradicts": ("lora", config_edit(fan_in_fan_out=True), "fan_in_fan_out is true, but no target"),
    "target_modules number": ("lora", config_edit(target_modules=5), "target_modules=5"),
    "target_modules null entry": ("lora", config_edit(target_modules=[None]), "target_modules=\\[None\\]"),
    "target_modules bad regex": ("lora", config_edit(target_modules="("), "target_modules '\\(' is not a valid"),
    "target_modules more": ("lora", config_edit(target_modules=["fc1", "fc2", "head"]),
                            "missing key 'base_model.model.head.lora_A.weight'"),
    "exclude_modules number": ("lora", config_edit(exclude_modules=3), "exclude_modules=3"),
    "exclude_modules bad regex": ("lora", config_edit(exclude_modules="["), "exclude_modules '\\[' is not a valid"),
    "modules_to_save number": ("lora", config_edit(modules_to_save=3), "modules_to_save=3"),
    "modules_to_save string": ("lora", config_edit(modules_to_save="head"), "modules_to_save='head'"),
    "modules_to_save without keys": ("lora", config_edit(modules_to_save=["head"]),
                                     "missing key 'base_model.model.head.(weight|bias)'"),
    "modules_to_save a lora layer": ("lora", config_edit(modules_to_save=["fc1"]), "listed in modules_to_save"),
    "rank_pattern list": ("lora", config_edit(rank_pattern=["0"]), "rank_pattern must be an object"),
    "rank_pattern zero": ("lora", config_edit(rank_pattern={"fc1": 0}), "rank_pattern\\['fc1'\\] = 0"),
    "rank_pattern string": ("lora", config_edit(rank_pattern={"fc1": "2"}), "rank_pattern\\['fc1'\\] = '2'"),
    "rank_pattern bool": ("lora", config_edit(rank_pattern={"fc1": True}), "rank_pattern\\['fc1'\\] = True"),
    "rank_pattern bad regex": ("lora", config_edit(rank_pattern={"(": 2}), "rank_pattern key '\\(' is not a valid"),
    "rank_pattern mismatch": ("lora", config_edit(rank_pattern={"fc1": 4}), "shape mismatch for layer 'fc1'"),
    "alpha_pattern zero": ("lora", config_edit(alpha_pattern={"fc1": 0}), "alpha_pattern\\['fc1'\\] = 0"),
    "alpha_pattern negative": ("lora", config_edit(alpha_pattern={"fc1": -1}), "alpha_pattern\\['fc1'\\] = -1"),
    "alpha_pattern true": ("lora", config_edit(alpha_pattern={"fc1": True}), "alpha_pattern\\['fc1'\\] = True"),
    "alpha_pattern NaN": ("lora", config_text('{"peft_type": "LORA", "r": 2, "alpha_pattern": {"fc1": NaN}}'),
                          "alpha_pattern\\['fc1'\\] = nan"),
    "alpha_pattern Infinity": ("lora", config_text('{"peft_type": "LORA", "r": 2, "alpha_pattern": '
                                                   '{"fc1": Infinity}}'), "alpha_pattern\\['fc1'\\] = inf"),
    "alpha_pattern string": ("lora", config_edit(alpha_pattern={"fc1": "x"}), "alpha_pattern\\['fc1'\\] = 'x'"),
    "alpha_pattern null value": ("lora", config_edit(alpha_pattern={"fc1": None}), "alpha_pattern\\['fc1'\\] = None"),
    "alpha_pattern number": ("lora", config_edit(alpha_pattern=3), "alpha_pattern must be an object"),
    "bias all": ("lora", config_edit(bias="all"), "bias='all'"),
    "bias lora_only": ("lora", config_edit(bias="lora_only"), "bias='lora_only'"),
    "use_dora": ("lora", config_edit(use_dora=True), "uses use_dora"),
    "layers_to_transform": ("lora", config_edit(layers_to_transform=[0]), "uses layers_to_transform"),
    "lora_bias": ("lora", config_edit(lora_bias=True), "uses lora_bias"),
    "target_parameters": ("lora", config_edit(target_parameters=["w"]), "uses target_parameters"),
    "init pissa": ("lora", config_edit(init_lora_weights="pissa"), "rewrites the base weights"),
    "init loftq": ("lora", config_edit(init_lora_weights="loftq"), "rewrites the base weights"),
    "config a list": ("lora", config_text("[1, 2]"), f"{CONFIG}: expected a JSON object, got list"),
    "config a string": ("lora", config_text('"LORA"'), f"{CONFIG}: expected a JSON object, got str"),
    "config a number": ("lora", config_text("7"), f"{CONFIG}: expected a JSON object, got int"),
    "config not json": ("lora", config_text("{peft_type: LORA"), f"{CONFIG}: not readable JSON"),
    "config empty": ("lora", config_text(""), f"{CONFIG}: not readable JSON"),
    "config not utf-8": ("lora", lambda d: (d / CONFIG).write_bytes(b"\xff\xfe{"), f"{CONFIG}: not readable JSON"),
    "config deeply nested": ("lora", config_text("[" * 100000 + "]" * 100000), f"{CONFIG}: not readable JSON"),
    "config missing": ("lora", lambda d: (d / CONFIG).unlink(), f"{CONFIG}: no such file"),
    "config a directory": ("lora", lambda d: ((d / CONFIG).unlink(), (d / CONFIG).mkdir()), f"{CONFIG}: no such file"),
    "config from another save": ("lora", lambda d: other_config(d), "is not the config saved with"),
    "weights missing": ("lora", lambda d: (d / WEIGHTS).unlink(), f"{WEIGHTS}: no such file"),
    "weights pickle only": ("lora", lambda d: ((d / WEIGHTS).rename(d / "adapter_model.bin")),
                            "adapter_model.bin is a pickle, which peftlite never loads"),
    "weights empty": ("lora", weights_bytes(b""), f"{WEIGHTS}: not a readable safetensors file"),
    "weights garbage": ("lora", weights_bytes(b"\x00" * 64), f"{WEIGHTS}: not a readable safetensors file"),
    "weights header too long": ("lora", weights_bytes((2**40).to_bytes(8, "little") + b"{}"),
                                f"{WEIGHTS}: not a readable safetensors file"),
    "weights header not json": ("lora", weights_bytes((4).to_bytes(8, "little") + b"{{{{"),
                                f"{WEIGHTS}: not a readable safetensors file"),
    "weights truncated": ("lora", truncate, f"{WEIGHTS}: not a readable safetensors file"),
    "weights a directory": ("lora", lambda d: ((d / WEIGHTS).unlink(), (d / WEIGHTS).mkdir()),
                            f"{WEIGHTS}: no such file"),
    "weights a symlink loop": ("lora", lambda d: ((d / WEIGHTS).unlink(), os.symlink(d / "loop", d / "loop"),
                                                  os.symlink(d / "loop", d / WEIGHTS)), f"{WEIGHTS}: no such file"),
    "A missing": ("lora", weights_edit(lambda t: t.pop(A)), f"missing key '{A}'"),
    "B missing": ("lora", weights_edit(lambda t: t.pop(B)), f"missing key '{B}'"),
    "layer missing": ("lora", weights_edit(lambda t: (t.pop(A), t.pop(B))), f"missing key '{A}'"),
    "no lora keys": ("lora", weights_edit(lambda t: t.clear() or t.update({"x": torch.zeros(1)})), "holds no LoRA"),
    "unexpected key": ("lora", put("base_model.model.fc1.lora_A.bias", torch.zeros(2)), "unexpected key"),
    "unexpected top key": ("lora", put("something_else", torch.zeros(2)), "unexpected key 'something_else'"),
    "mixed key kinds": ("lora", put("base_model.model.fc1.lora_embedding_A", torch.zeros(2, 3)), "mixes key kinds"),
    "embedding keys on a linear": ("lora", weights_edit(lambda t: (t.__setitem__(
        "base_model.model.fc1.lora_embedding_A", t.pop(A)), t.__setitem__("base_model.model.fc1.lora_embedding_B",
                                                                          t.pop(B)))),
        "module 'fc1' is a Linear, whose LoRA keys end in 'lora_A.weight'"),
    "A wrong shape": ("lora", put(A, torch.zeros(2, 11)), "shape mismatch for layer 'fc1'"),
    "B wrong shape": ("lora", put(B, torch.zeros(23, 2)), "shape mismatch for layer 'fc1'"),
    "A transposed": ("lora", weights_edit(lambda t: t.__setitem__(A, t[A].t().contiguous())), "shape mismatch"),
    "A scalar": ("lora", put(A, torch.zeros(())), "layer 'fc1' has A of shape \\(\\) .* expected 2-D pairs"),
    "A int64": ("lora", put(A, torch.zeros(2, 12, dtype=torch.int64)), "dtype torch.int64"),
    "A bool": ("lora", put(A, torch.zeros(2, 12, dtype=torch.bool)), "dtype torch.bool"),
    "B int8": ("lora", put(B, torch.zeros(24, 2, dtype=torch.int8)), "dtype torch.float32/torch.int8"),
    "A NaN": ("lora", weights_edit(lambda t: t[A].view(-1)[3:4].fill_(math.nan)), f"'{A}' holds NaN or Inf"),
    "B Inf": ("lora", weights_edit(lambda t: t[B].view(-1)[0:1].fill_(math.inf)), f"'{B}' holds NaN or Inf"),
    "B -Inf": ("lora", weights_edit(lambda t: t[B].view(-1)[5:6].fill_(-math.inf)), f"'{B}' holds NaN or Inf"),
    "fp16 NaN": ("lora", weights_edit(lambda t: t.__setitem__(B, torch.full((24, 2), math.nan).half())),
                 f"'{B}' holds NaN or Inf"),
    "key for a norm": ("lora", weights_edit(lambda t: t.update({
        "base_model.model.norm.lora_A.weight": torch.zeros(2, 24),
        "base_model.model.norm.lora_B.weight": torch.zeros(24, 2)})), "'norm' is a LayerNorm, which LoRA does not"),
    "key for the root": ("lora", weights_edit(lambda t: t.update({
        "base_model.model..lora_A.weight": torch.zeros(2, 12),
        "base_model.model..lora_B.weight": torch.zeros(24, 2)})), "unexpected key 'base_model.model..lora_A.weight'"),
    "key for no module": ("lora", weights_edit(lambda t: t.update({
        "base_model.model.fc9.lora_A.weight": torch.zeros(2, 12),
        "base_model.model.fc9.lora_B.weight": torch.zeros(24, 2)})), "the model has no module 'fc9'"),
    "saved module shape": ("head", put("base_model.model.head.weight", torch.zeros(5, 19)),
                           "shape mismatch for 'base_model.model.head.weight'"),
    "saved module missing": ("head", weights_edit(lambda t: t.pop("base_model.model.head.bias")),
                             "missing key 'base_model.model.head.bias'"),
    "saved module int": ("head", put("base_model.model.head.weight", torch.zeros(5, 20, dtype=torch.int32)),
                         "'base_model.model.head.weight' has dtype torch.int32"),
    "saved module NaN": ("head", weights_edit(lambda t: t["base_model.model.head.weight"].fill_(math.nan)),
                         "holds NaN or Inf"),
    "saved module unexpected": ("head", put("base_model.model.head.extra", torch.zeros(1)), "unexpected key"),
    # prefix tuning files
    "prefix extra tensor": ("prefix", put("other", torch.zeros(1)), "expected exactly one tensor 'prompt_embeddings'"),
    "prefix no tensor": ("prefix", weights_edit(lambda t: t.clear() or t.update({"x": torch.zeros(1)})),
                         "expected exactly one tensor 'prompt_embeddings'"),
    "prefix wrong shape": ("prefix", put("prompt_embeddings", torch.zeros(3, 7)), "'prompt_embeddings' has shape"),
    "prefix int": ("prefix", weights_edit(lambda t: t.__setitem__("prompt_embeddings",
                                                                  t["prompt_embeddings"].long())), "dtype torch.int64"),
    "prefix NaN": ("prefix", weights_edit(lambda t: t["prompt_embeddings"].fill_(math.nan)), "holds NaN or Inf"),
    "prefix tokens 0": ("prefix", config_edit(num_virtual_tokens=0), "num_virtual_tokens, num_layers"),
    "prefix tokens string": ("prefix", config_edit(num_virtual_tokens="3"), "num_virtual_tokens, num_layers"),
    "prefix layers mismatch": ("prefix", config_edit(num_layers=3), "has shape"),
    "prefix heads zero": ("prefix", config_edit(num_attention_heads=0), "num_virtual_tokens, num_layers"),
    "prefix token_dim indivisible": ("prefix", config_edit(token_dim=31), "token_dim divisible"),
    "prefix encoder-decoder": ("prefix", config_edit(num_transformer_submodules=2), "num_transformer_submodules=2"),
    # bottleneck files
    "bottleneck modules missing": ("bottleneck", config_drop("modules"), "'modules' must map module names"),
    "bottleneck modules empty": ("bottleneck", config_edit(modules={}), "'modules' must map module names"),
    "bottleneck modules list": ("bottleneck", config_edit(modules=["fc1"]), "'modules' must map module names"),
    "bottleneck root": ("bottleneck", config_edit(modules={"": {}}), "names the root module"),
    "bottleneck no module": ("bottleneck", config_edit(modules={"fc9": {}}), "the model has no module 'fc9'"),
    "bottleneck options list": ("bottleneck", config_edit(modules={"fc1": [1]}), "options of 'fc1' must be a JSON"),
}


def bottleneck_option(**change):
    def edit(directory):
        path = directory / CONFIG
        config = json.loads(path.read_text())
        config["modules"]["fc1"].update(change)
        path.write_text(json.dumps(config))
    return edit


FILES["prefix targets a string"] = ("prefix", config_edit(peftlite_targets="model"), "peftlite_targets='model'")
FILES["prefix targets empty"] = ("prefix", config_edit(peftlite_targets=[]), "peftlite_targets=\\[\\]")
FILES["prefix targets numbers"] = ("prefix", config_edit(peftlite_targets=[1]), "peftlite_targets=\\[1\\]")
FILES["prefix targets unknown"] = ("prefix", config_edit(peftlite_targets=["model.nope"]),
                                   "peftlite_targets names 'model.nope'")
FILES["bottleneck activation"] = ("bottleneck", bottleneck_option(activation="softmax"), "activation='softmax'")
FILES["bottleneck mode"] = ("bottleneck", bottleneck_option(mode="x"), "mode='x'")
FILES["bottleneck scaling nan"] = ("bottleneck", lambda d: nan_scaling(d), "scaling=nan")
FILES["bottleneck dim"] = ("bottleneck", bottleneck_option(dim=5), "dim=5 does not match")
FILES["bottleneck dim string"] = ("bottleneck", bottleneck_option(dim="24"), "dim='24'")
FILES["bottleneck size"] = ("bottleneck", bottleneck_option(bottleneck=4), "shape mismatch")
FILES["bottleneck key missing"] = ("bottleneck", weights_edit(lambda t: t.pop(
    "base_model.model.fc1.adapter.up.bias")), "missing key 'base_model.model.fc1.adapter.up.bias'")
FILES["bottleneck key unexpected"] = ("bottleneck", put("base_model.model.fc1.adapter.extra", torch.zeros(1)),
                                      "unexpected key")
FILES["bottleneck key int"] = ("bottleneck", weights_edit(lambda t: t.__setitem__(
    "base_model.model.fc1.adapter.up.bias", torch.zeros(24, dtype=torch.int64))), "dtype torch.int64")
FILES["bottleneck NaN"] = ("bottleneck", weights_edit(lambda t: t["base_model.model.fc1.adapter.up.weight"].fill_(
    math.inf)), "holds NaN or Inf")


def nan_scaling(directory):
    path = directory / CONFIG
    text = path.read_text().replace('"scaling": 1.0', '"scaling": NaN')
    path.write_text(text)


def other_config(directory):
    other = directory.parent / "other"
    model = peftlite.inject(mlp(), rank=2, alpha=5)
    peftlite.save_adapter(model, other)
    (directory / CONFIG).write_text((other / CONFIG).read_text())


def source(which, directory):
    """Save a valid adapter of ``which`` kind into ``directory``; return a fresh model to load it into."""
    if which in ("lora", "head"):
        model = peftlite.inject(mlp(), rank=2, trainable=["head"] if which == "head" else None)
        peftlite.save_adapter(model, directory)
        return mlp()
    if which == "prefix":
        peftlite.save_adapter(peftlite.inject(tiny_llama(), method="prefix", prefix_len=3), directory)
        return tiny_llama()
    peftlite.save_adapter(peftlite.inject(mlp(), method="adapter", targets=["fc1"], reduction_factor=8), directory)
    return mlp()


@pytest.mark.parametrize("case", list(FILES))
def test_bad_file_raises_a_clear_error_and_changes_nothing(case, tmp_path):
    which, edit, match = FILES[case]
    directory = tmp_path / "adapter"
    model = source(which, directory)
    edit(directory)
    before, files = snapshot(model), directory_state(tmp_path) if case != "weights a symlink loop" else None
    with pytest.raises(PeftliteError, match=match):
        peftlite.load_adapter(model, directory)
    assert_unchanged(model, before)
    if files is not None:
        assert directory_state(tmp_path) == files


def test_the_table_is_large():
    assert len(CALLS) + len(FILES) >= 200


# ---- valid edge cases that must keep working ----

@pytest.mark.parametrize("options", [
    {"rank": 1}, {"rank": 64}, {"alpha": 1e-6}, {"alpha": 3}, {"dropout": 0}, {"dropout": 0.999},
    {"rslora": True}, {"init": "gaussian"}, {"name": "task-1_b"}, {"adapter_dtype": torch.float64},
    {"targets": ("fc1",)}, {"targets": {"fc2"}}, {"targets": r"fc\d"}, {"exclude": ["fc2"]},
    {"targets": lambda name, module: name == "fc1"}, {"trainable": []}, {"trainable": ["norm"]},
])
def test_valid_edge_cases_inject_and_round_trip(options, tmp_path):
    model = peftlite.inject(mlp(), **options)
    peftlite.save_adapter(model, tmp_path, name=options.get("name", "default"))
    fresh = peftlite.load_adapter(mlp(), tmp_path, name=options.get("name", "default"))
    x = torch.randn(2, 12)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
