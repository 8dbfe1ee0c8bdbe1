#!/usr/bin/env python3
"""The longest functions of C++/CUDA sources, by lines from signature to closing brace.

    tools/function_lengths.py [--top 10] [--include-kernels] PATH...

PATHs are files or folders (*.cpp, *.cu, *.h, *.cuh). A function is a brace block opened at namespace
depth whose header has a parameter list; lambdas and classes count with their enclosing function.
CUDA __global__ kernels are left out unless --include-kernels (docs/ARCHITECTURE.md: no function over
~120 lines, kernels excepted). Braces in strings and comments are ignored.
"""
import argparse
import os
import re
import sys


def strip(line, in_comment):
    out, i = [], 0
    while i < len(line):
        if in_comment:
            j = line.find("*/", i)
            if j < 0:
                return "".join(out), True
            i, in_comment = j + 2, False
        elif line.startswith("//", i):
            break
        elif line.startswith("/*", i):
            in_comment, i = True, i + 2
        elif line[i] in "\"'":
            q, i = line[i], i + 1
            while i < len(line) and line[i] != q:
                i += 2 if line[i] == "\\" else 1
            i += 1
            out.append(" ")
        else:
            out.append(line[i])
            i += 1
    return "".join(out), in_comment


def functions(path):
    lines = open(path, encoding="utf-8", errors="replace").read().split("\n")
    depth, scope, in_comment, header = 0, [], False, []
    found = []
    for n, raw in enumerate(lines, 1):
        code, in_comment = strip(raw, in_comment)
        for i, ch in enumerate(code):
            if ch == "{":
                text = " ".join([t for _, t in header] + [code[:i].strip()])
                kind = "block"
                if not scope or scope[-1][0] == "namespace":
                    if re.search(r"\bnamespace\b", text) or text.strip() == "" or text.strip().startswith("extern"):
                        kind = "namespace"
                    elif re.search(r"\b(struct|class|union|enum)\b[^()]*$", text):
                        kind = "type"
                    elif "(" in text and not text.rstrip().endswith("="):
                        kind = "function"
                start = header[0][0] if header and code[:i].strip() == "" or header and "(" not in code[:i] else n
                if header and "(" in " ".join(t for _, t in header):
                    start = header[0][0]
                scope.append((kind, start, text))
                header = []
            elif ch == "}":
                if scope:
                    kind, start, text = scope.pop()
                    if kind == "function":
                        name = re.sub(r"\s+", " ", text.split("(")[0]).strip().split(" ")[-1]
                        found.append((n - start + 1, path, start, name, "__global__" in text))
                header = []
            elif ch == ";" and (not scope or scope[-1][0] in ("namespace", "type")):
                header = []
        if (not scope or scope[-1][0] in ("namespace", "type")) and code.strip() and "{" not in code and "}" not in code:
            if not code.strip().startswith("#") and not code.rstrip().endswith(";"):
                header.append((n, code.strip()))
            elif code.rstrip().endswith(";"):
                header = []
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--include-kernels", action="store_true")
    a = ap.parse_args()
    files = []
    for p in a.paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                files += [os.path.join(root, f) for f in names if f.endswith((".cpp", ".cu", ".h", ".cuh"))]
        else:
            files.append(p)
    rows = [r for f in sorted(files) for r in functions(f) if a.include_kernels or not r[4]]
    rows.sort(key=lambda r: -r[0])
    for length, path, start, name, _ in rows[: a.top]:
        print("%5d  %s:%d  %s" % (length, path, start, name))


if __name__ == "__main__":
    sys.exit(main())
