"""HTTP-level cases: content types, empty and oversized bodies, multipart framing, routes, ids, query, raw framing."""

from __future__ import annotations

import numpy as np

from .encoders import MAX_BODY, MAX_GRIDS, MULTIPART, Corpus, encode, multipart, pack


def add_http_cases(corpus: Corpus, nrng: np.random.Generator, grids: np.ndarray) -> None:
    add = corpus.add
    png = encode(grids[0], "PNG")
    ctypes = ["image/png", "image/jpeg", "image/webp", "application/msgpack", "application/json", None]

    for ctype in [*ctypes, MULTIPART, "text/plain"]:
        add("empty_body", f"empty_{ctype}", b"", ctype)

    # content types we do not take, with a valid PNG body
    for ctype in [
        "text/plain",
        "application/octet-stream",
        None,
        "image/gif",
        "image/bmp",
        "image/tiff",
        "image/*",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/mixed; boundary=fuzzboundary",
        "application/protobuf",
        "image",
        "*/*",
        ";;;",
    ]:
        add("content_type", f"ctype_{ctype}", png, ctype, status=415)

    # oversized bodies: with Content-Length, and chunked without it
    big = nrng.integers(0, 256, MAX_BODY + 1, dtype=np.uint8).tobytes()
    for ctype in ("image/png", "application/msgpack", "application/json", MULTIPART):
        add("oversized", f"oversized_cl_{ctype}", big, ctype, status=413)
        add("oversized", f"oversized_chunked_{ctype}", big + big[:500_000], ctype, chunked=True, status=413)
    add("oversized", "oversized_msgpack_one_grid", pack({"grids": [{"image": big}]}), "application/msgpack", status=413)

    # malformed multipart
    good_part = [("grid", "a.png", png)]
    cases = {
        "boundary_mismatch": ("multipart/form-data; boundary=other", multipart(good_part)),
        "no_boundary_param": ("multipart/form-data", multipart(good_part)),
        "empty_boundary": ("multipart/form-data; boundary=", multipart(good_part)),
        "no_files_fields_only": (MULTIPART, multipart([("grid", None, b"abc")])),
        "no_parts": (MULTIPART, b"--fuzzboundary--\r\n"),
        "garbage": (MULTIPART, b"garbage" * 50),
        "no_content_disposition": (
            MULTIPART,
            b"--fuzzboundary\r\nContent-Type: image/png\r\n\r\nabc\r\n--fuzzboundary--\r\n",
        ),
        "truncated_headers": (MULTIPART, multipart(good_part)[:40]),
        "unclosed_part": (MULTIPART, multipart(good_part, close=False)[:200]),
        "too_many_files": (MULTIPART, multipart([("grid", f"{i}.png", b"x") for i in range(MAX_GRIDS + 1)])),
        "header_line_junk": (
            MULTIPART,
            b"--fuzzboundary\r\n\x00\x01\x02 no colon here\r\n\r\nabc\r\n--fuzzboundary--\r\n",
        ),
        "random_after_boundary": (
            MULTIPART,
            b"--fuzzboundary\r\n" + nrng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        ),
    }
    for name, (ctype, blob) in cases.items():
        add("multipart_malformed", f"multipart_{name}", blob, ctype)

    # wrong method / path
    add("route", "get_mrc", b"", None, method="GET", status=405)
    add("route", "put_mrc", png, "image/png", method="PUT", status=405)
    add("route", "delete_mrc", b"", None, method="DELETE", status=405)
    add("route", "post_unknown_path", png, "image/png", path="/mrc/extra", status=404)
    add("route", "post_v1_mrc", png, "image/png", path="/v1/mrc", status=404)

    # request ids the idempotency cache must not take: refused, never truncated or mangled
    for name, rid in (
        ("129_chars", b"r" * 129),
        ("10k_chars", b"r" * 10_000),
        ("latin1", b"\xff\xfe\xe9"),
        ("empty", b""),
        ("inner_whitespace", b"a b\tc"),
        ("inner_space", b"retry 1"),
        ("utf8", "réessai".encode()),
        ("del_char", b"id\x7f"),
    ):
        for body, label in ((png, "good_body"), (png[:300], "bad_body")):
            add(
                "request_id_header",
                f"request_id_{name}_{label}",
                body,
                "image/png",
                headers=(("x-request-id", rid),),
                status=400,
            )
    # a valid id on a bad body: the body's error, twice (errors are not remembered)
    for suffix in ("a", "b"):
        add(
            "request_id_header",
            f"request_id_valid_bad_body_{suffix}",
            png[:300],
            "image/png",
            headers=(("x-request-id", b"fuzz-repeated"),),
            status=400,
        )

    # ?return_renders that is not a boolean
    for value in ("maybe", "2", "tru", "%00", "x" * 500):
        add("query", f"return_renders_{value[:8]}", png, "image/png", path=f"/mrc?return_renders={value}", status=400)


#: Raw bytes on a fresh connection that are not valid HTTP/1.1: each must get a JSON error (uvicorn's own
#: framing errors included; a request line h11 can read, like HTTP/2's preface, reaches the app and gets its 4xx).
FRAMING: dict[str, bytes] = {
    "garbage_line": b"GARBAGE\r\n\r\n",
    "no_host_http11": b"POST /mrc HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "content_length_not_a_number": b"POST /mrc HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "content_length_twice": b"POST /mrc HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    "space_in_header_name": b"POST /mrc HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    "header_without_colon": b"POST /mrc HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "nul_in_request_line": b"POST /m\x00rc HTTP/1.1\r\nHost: x\r\n\r\n",
    "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "version_9": b"POST /mrc HTTP/9.9\r\nHost: x\r\n\r\n",
    "transfer_encoding_gzip": b"POST /mrc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "bad_chunk_size": (
        b"POST /mrc HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ZZ\r\nabc\r\n0\r\n\r\n"
    ),
    "headers_over_limit": b"POST /mrc HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17_000 + b"\r\n\r\n",
}
