"""
The evaluation of cattrs as the project's codec (issue 8 item 16; the decision and the
figures are in L{agent.codec}'s docstring). Not part of C{make bench}: cattrs is not a
dependency. Run C{.venv/bin/pip install cattrs} then C{.venv/bin/python -m bench.eval_cattrs}.

It builds cattrs converters with the codec's policy (strict primitives, unknown fields
ignored, field paths in errors, camelCase on the agent wire, the same version check), swaps
them in for the bus's and the agent's codec, and compares thread-CPU microseconds per
operation with the codec's own, interleaved in one process (minimum over the rounds).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from agent import protocol as p
from agent.codec import Codec, CodecError, camel_case
from zcontrol.bus import message as bm
from zcontrol.bus.message import NeedReplyMessage, Reply, registry
from zcontrol.core.errors import SYS, ErrorCode, error_code


@registry.register
@attrs.define(kw_only=True)
class EvalEcho(NeedReplyMessage):
    n: int = 0


def _strict(check: Any, name: str, convert: Any = None) -> Any:
    def hook(value: Any, _tp: Any) -> Any:
        if check(value):
            return convert(value) if convert else value
        raise TypeError(f"must be {name}")

    return hook


def _converter() -> cattrs.Converter:
    c = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    c.register_structure_hook(str, _strict(lambda v: type(v) is str, "a str"))
    c.register_structure_hook(bool, _strict(lambda v: v is True or v is False, "a bool"))
    c.register_structure_hook(int, _strict(lambda v: type(v) is int, "an integer"))
    c.register_structure_hook(float, _strict(lambda v: type(v) in (int, float), "a number",
                                             float))
    return c


class CattrsCodec:
    """
    The subset of L{Codec} the bus and the agent protocol call, on a cattrs converter.
    """

    def __init__(self, converter: cattrs.Converter, ours: Codec):
        self.converter, self.ours = converter, ours

    def encode_top(self, obj: Any) -> dict:
        body = self.converter.unstructure(obj)
        body["_v"] = "1.0"
        return body

    def check_version(self, body: Any, path: str) -> int:
        return self.ours.check_version(body, path)

    def decode_checked(self, cls: type, body: Any, path: str, reserved: int) -> Any:
        try:
            return self.converter.structure(body, cls)
        except (ClassValidationError, IterableValidationError) as e:
            raise CodecError("; ".join(cattrs.transform_error(e, path=path))) from None

    def decode_top(self, cls: type, body: Any, path: str | None = None) -> Any:
        path = path or cls.__name__
        if not isinstance(body, dict):
            raise CodecError(f"{path} must be an object")
        return self.decode_checked(cls, body, path, self.check_version(body, path))


def cattrs_codecs() -> tuple[CattrsCodec, CattrsCodec]:
    bus = _converter()
    bus.register_structure_hook(ErrorCode, lambda v, _t: bm._decode_error_code(v))
    bus.register_unstructure_hook(ErrorCode, lambda e: e.to_dict())
    agent = _converter()

    def is_message(tp: Any) -> bool:
        return isinstance(tp, type) and issubclass(tp, p.Message)

    def renames(cls: type) -> dict:
        return {a.name: override(rename=camel_case(a.name)) for a in attrs.fields(cls)}

    agent.register_structure_hook_factory(
        is_message, lambda cls: make_dict_structure_fn(cls, agent, **renames(cls)))
    agent.register_unstructure_hook_factory(
        is_message, lambda cls: make_dict_unstructure_fn(cls, agent, **renames(cls)))
    return CattrsCodec(bus, bm._CODEC), CattrsCodec(agent, p._CODEC)


def operations() -> dict:
    request = EvalEcho(service_id="echo", n=7, resource_uuid="r" * 32, timeout=30.0,
                       deadline=1234.5, reply_to="node-1", headers={"k": "v"})
    reply = Reply.failure(error_code(SYS.OPERATION_ERROR, "boom", error_code(SYS.TIMEOUT, "t")),
                          "c" * 32)
    nics = [p.NicTO(mac=f"fa:16:3e:00:00:0{i}", ip=f"10.0.0.{i}", netmask="255.255.255.0",
                    device_id=i) for i in range(2)]
    cmd = p.StartVmCmd(vm_instance_uuid="v" * 32, vm_name="vm", cpu_num=2,
                       memory_size=2 << 30, nics=nics, root_volume_install_path="/x.qcow2")
    request_data, reply_data = registry.encode(request), registry.encode(reply)
    cmd_data = cmd.to_json()
    return {"bus_request_encode_us": lambda: registry.encode(request),
            "bus_request_decode_us": lambda: registry.decode(request_data),
            "bus_reply_encode_us": lambda: registry.encode(reply),
            "bus_reply_decode_us": lambda: registry.decode(reply_data),
            "agent_cmd_encode_us": cmd.to_json,
            "agent_cmd_decode_us": lambda: p.StartVmCmd.from_json(cmd_data)}


def main(rounds: int = 20, n: int = 2000) -> dict:
    variants = {"codec": (bm._CODEC, p._CODEC), "cattrs": cattrs_codecs()}
    ops = operations()
    best: dict[str, dict[str, float]] = {v: {} for v in variants}
    for _ in range(rounds):
        for variant, (bus_codec, agent_codec) in variants.items():
            bm._CODEC, p._CODEC = bus_codec, agent_codec
            for name, fn in ops.items():
                fn()
                start = time.thread_time()
                for _ in range(n):
                    fn()
                us = (time.thread_time() - start) / n * 1e6
                best[variant][name] = round(min(best[variant].get(name, us), us), 2)
    bm._CODEC, p._CODEC = variants["codec"]
    print(json.dumps(best, sort_keys=True))
    return best


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
