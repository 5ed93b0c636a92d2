"""msgpack and JSON bodies: undecodable, wrong envelopes (a 4xx), wrong entries (that grid's ``invalid``)."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import numpy as np

from carve3d_reward.service.responses import to_jsonable

from .encoders import GRIDS, MAX_GRIDS, Corpus, encode, pack


def bad_entries(grid: np.ndarray, png: bytes) -> dict[str, dict[str, Any]]:
    """Grid entries that are wrong in one way each: every type of every field, and the values that used to pass."""
    raw = grid.tobytes()
    h, w = grid.shape[:2]
    out: dict[str, Any] = {
        "entry_int": 1,
        "entry_list": [png],
        "entry_nil": None,
        "entry_str": "png",
        "entry_bool": True,
        "entry_empty_map": {},
        "entry_empty_image": {"image": b""},
        "entry_both_image_and_data": {"image": png, "data": raw, "shape": [h, w, 3]},
        "entry_image_as_str_in_msgpack": {"image": "iVBORw0KGgo="},
    }
    for name, value in {"int": 12, "float": 1.5, "bool": True, "list": [1, 2], "map": {"a": 1}}.items():
        out[f"image_{name}"] = {"image": value}
        out[f"data_{name}"] = {"data": value, "shape": [h, w, 3]}
    shapes: dict[str, Any] = {
        "missing": None,
        "len2": [h, w * 3],
        "len4": [1, h, w, 3],
        "negative": [-h, -w, 3],
        "zero": [0, 0, 3],
        "strings": [str(h), str(w), "3"],
        "floats": [float(h), float(w), 3.0],
        "scalar": h * w * 3,
        "4_channels": [h * 3 // 4, w, 4],
        "huge": [1 << 40, 1 << 40, 3],
        "uint64": [(1 << 64) - 1, 1, 3],
        "int64_min": [-(1 << 63), 1, 3],
        "over_max_pixels": [2048, 2048, 3],
        "bools": [True, True, 3],  # answered 500 before: isinstance(True, int)
        "bool_channels": [h, w, True],
        "nested_lists": [[h], [w], [3]],
        "nil_items": [None, None, None],
        "bytes_items": [b"\x80", b"\x80", b"\x03"],
        "map": {"h": h, "w": w, "c": 3},
        "str": f"{h},{w},3",
    }
    for name, shape in shapes.items():
        entry: dict[str, Any] = {"data": raw}
        if shape is not None:
            entry["shape"] = shape
        out[f"shape_{name}"] = entry
    dtypes: dict[str, Any] = {
        "float32": "float32",
        "upper": "UINT8",
        "numpy_code": "<u1",
        "int": 8,
        "bool": True,
        "nil": None,
        "bytes": b"uint8",
        "list": ["uint8"],
    }
    for name, dtype in dtypes.items():
        out[f"dtype_{name}"] = {"data": raw, "shape": [h, w, 3], "dtype": dtype}
    out["data_short"] = {"data": raw[:-1], "shape": [h, w, 3]}
    out["data_long"] = {"data": raw + b"\x00", "shape": [h, w, 3]}
    out["data_float_bytes"] = {"data": raw * 4, "shape": [h, w, 3]}
    out["data_odd_size"] = {"data": bytes(129 * 128 * 3), "shape": [129, 128, 3]}
    out["data_tiny"] = {"data": bytes(3), "shape": [1, 1, 3]}
    return out


def add_structured_cases(corpus: Corpus, rng: random.Random, grids: np.ndarray) -> None:
    add = corpus.add
    grid = grids[0]
    png = encode(grid, "PNG")
    valid_req = pack({"grids": [{"image": png}], "return_renders": False})

    # msgpack that does not decode
    for i in range(20):
        add(
            "msgpack_undecodable",
            f"msgpack_trunc_{i}",
            valid_req[: rng.randrange(1, len(valid_req) - 1)],
            "application/msgpack",
        )
    undecodable = {
        "reserved_c1": b"\xc1",
        "map_missing_values": b"\x82\xa5grids",
        "bin_len_past_end": b"\x81\xa5grids\x91\x81\xa5image\xc6\xff\xff\xff\xff",
        "str_bad_utf8": b"\x81\xa5grids\x91\x81\xa5dtype\xa2\xff\xfe",
        "int_map_key": b"\x81\x01\x90",
        "nested_100k": b"\x91" * 100_000,
        "ext_type": b"\x81\xa5grids\x91\xd6\x05abcd",
        "timestamp_ext": b"\x81\xa5grids\x91\xd6\xff\x00\x00\x00\x01",
        "trailing_bytes": valid_req + b"\x00",
        "array_len_huge": b"\xdd\xff\xff\xff\xff",
        "map_len_huge": b"\xdf\xff\xff\xff\xff",
        "grids_257": pack({"grids": [{"image": b"x"}] * (MAX_GRIDS + 1)}),
    }
    for name, blob in undecodable.items():
        add("msgpack_undecodable", name, blob, "application/msgpack")

    # wrong envelopes: the whole request is refused (same messages in both encodings)
    envelopes: dict[str, Any] = {
        "list_at_top": [{"image": png}],
        "int_at_top": 5,
        "nil_at_top": None,
        "str_at_top": "grids",
        "no_grids": {"return_renders": False},
        "grids_not_list": {"grids": {"image": png}},
        "grids_str": {"grids": "png"},
        "grids_nil": {"grids": None},
        "grids_empty": {"grids": []},
        "return_renders_str": {"grids": [{"image": png}], "return_renders": "yes"},
        "return_renders_int": {"grids": [{"image": png}], "return_renders": 1},
        "return_renders_nil": {"grids": [{"image": png}], "return_renders": None},
        "return_renders_list": {"grids": [{"image": png}], "return_renders": [True]},
    }
    for name, obj in envelopes.items():
        add("msgpack_envelope", f"msgpack_{name}", pack(obj), "application/msgpack")
        add("json_envelope", f"json_{name}", json.dumps(to_jsonable(obj)).encode(), "application/json")
    add(
        "json_envelope",
        "json_grids_257",
        json.dumps({"grids": [{"image": "eA=="}] * (MAX_GRIDS + 1)}).encode(),
        "application/json",
        status=413,
    )

    # wrong entries: that grid is invalid, alone and between two good grids (which are scored)
    good = {"data": grids[4].tobytes(), "shape": list(grids[4].shape)}
    for name, entry in bad_entries(grid, png).items():
        alone, between = {"grids": [entry]}, {"grids": [good, entry, good]}
        add("msgpack_entry", f"msgpack_{name}", pack(alone), "application/msgpack", expect=GRIDS, statuses=("invalid",))
        add(
            "msgpack_entry",
            f"msgpack_{name}_between_good",
            pack(between),
            "application/msgpack",
            expect=GRIDS,
            statuses=("scored", "invalid", "scored"),
        )
        body = json.dumps(to_jsonable(between)).encode()
        add(
            "json_entry",
            f"json_{name}_between_good",
            body,
            "application/json",
            expect=GRIDS,
            statuses=("scored", "invalid", "scored"),
            accept="application/json",
        )

    # JSON text that does not parse
    valid_json = json.dumps(to_jsonable({"grids": [{"image": png}]})).encode()
    bad_json = {
        "truncated_1": valid_json[:1],
        "truncated_half": valid_json[: len(valid_json) // 2],
        "trailing_comma": b'{"grids": [],}',
        "single_quotes": b"{'grids': []}",
        "nan_bare": b'{"grids": NaN',
        "latin1": '{"grids": ["é"]}'.encode("latin-1"),
        "utf16": '{"grids": []}'.encode("utf-16"),
        "bom_garbage": b"\xef\xbb\xbf\xff\xfe",
        "deep_array": b"[" * 100_000,
        "deep_object": b'{"a":' * 20_000,
        "deep_in_grids": b'{"grids":' + b"[" * 5_000,
        "huge_int": b'{"grids": [{"data": "AAAA", "shape": [' + b"9" * 5000 + b", 1, 3]}]}",
        "only_whitespace": b"   \n\t ",
        "two_documents": valid_json + valid_json,
    }
    for name, blob in bad_json.items():
        add("json_invalid", f"json_{name}", blob, "application/json")

    # base64 that does not decode: that grid is invalid
    bad_b64 = {
        "not_base64": "!!!not base64!!!",
        "missing_padding": "QUI",
        "padding_inside": "QU=J",
        "one_char_over": "QUJDR",
        "non_ascii": "Ã©Ã©Ã©Ã©",
        "url_safe_alphabet": base64.urlsafe_b64encode(b"\xfb\xff" * 30).decode(),
        "embedded_newline": base64.b64encode(png[:60]).decode()[:40] + "\n" + base64.b64encode(png[:60]).decode()[40:],
        "truncated": base64.b64encode(png).decode()[:-3],
    }
    for name, text in bad_b64.items():
        for key, entry in (("image", {"image": text}), ("data", {"data": text, "shape": [128, 128, 3]})):
            body = json.dumps({"grids": [entry]}).encode()
            add(
                "json_bad_base64",
                f"b64_{key}_{name}",
                body,
                "application/json",
                expect=GRIDS,
                statuses=("invalid",),
                accept="application/json",
            )
