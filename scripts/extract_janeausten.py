"""Extracts the six Jane Austen novels from Debian's r-cran-janeaustenr data (no R needed).

data/Rdata.rdb is an R lazy-load database: blobs of [u32 big-endian uncompressed length][zlib
stream], one per object. Each object here is an R character vector in XDR serialization
("X\\n", version ints, then STRSXP with CHARSXP elements: flags (type 9 in the low byte),
i32 length (-1 = NA), bytes). Every element is one line of a novel. The novel is recognised by
its title line; each is written as <name>.txt with one line per element.

Usage: /usr/bin/python3 scripts/extract_janeausten.py RDATA_RDB OUT_DIR
"""

import os
import struct
import sys
import zlib

TITLES = {
    "EMMA": "emma",
    "MANSFIELD PARK": "mansfield_park",
    "NORTHANGER ABBEY": "northanger_abbey",
    "PERSUASION": "persuasion",
    "PRIDE AND PREJUDICE": "pride_and_prejudice",
    "SENSE AND SENSIBILITY": "sense_and_sensibility",
}


def blobs(data):
    pos = 0
    while pos + 4 <= len(data):
        d = zlib.decompressobj()
        out = d.decompress(data[pos + 4:])
        yield out
        consumed = len(data) - pos - 4 - len(d.unused_data)
        pos += 4 + consumed


def strings(obj):
    if obj[:2] != b"X\n":
        return None
    pos = 2
    version = struct.unpack(">i", obj[pos:pos + 4])[0]
    pos += 12
    if version == 3:
        n = struct.unpack(">i", obj[pos:pos + 4])[0]
        pos += 4 + n
    flags, length = struct.unpack(">ii", obj[pos:pos + 8])
    if flags & 0xFF != 16:  # STRSXP
        return None
    pos += 8
    lines = []
    for _ in range(length):
        cflags, n = struct.unpack(">ii", obj[pos:pos + 8])
        pos += 8
        if cflags & 0xFF != 9:
            raise ValueError("unexpected element type %d" % (cflags & 0xFF))
        if n < 0:
            lines.append("")
            continue
        lines.append(obj[pos:pos + n].decode("utf-8", "replace"))
        pos += n
    return lines


def main():
    rdb, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    with open(rdb, "rb") as f:
        data = f.read()
    found = set()
    for obj in blobs(data):
        lines = strings(obj)
        if not lines:
            continue
        head = [l.strip().upper() for l in lines[:20]]
        name = next((v for k, v in TITLES.items() if k in head), None)
        if name is None:
            continue
        with open(os.path.join(out_dir, name + ".txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        found.add(name)
    missing = sorted(set(TITLES.values()) - found)
    if missing:
        sys.exit("extract_janeausten: not found in %s: %s" % (rdb, ", ".join(missing)))


if __name__ == "__main__":
    main()
