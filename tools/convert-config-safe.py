#!/usr/bin/env python
"""Rewrite the original AFF / Mask2Former configs' ``!!python/object/apply:eval`` values as plain
YAML lists, so that the files load with ``yaml.safe_load`` (as ``aff_seg.load_config`` requires).

    python tools/convert-config-safe.py configs/ade20k/Base-ADE20K-SemanticSegmentation.yaml [...]
    python tools/convert-config-safe.py --output safe.yaml original.yaml

The originals write e.g. ``MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * 512) for
x in range(5, 21)]"]``. The expression is never run with ``eval``: it is parsed, and only a
list of numbers or a list comprehension of integer/float arithmetic (``+ - * / //``, ``int``,
``round``) over one ``range`` of integer constants is computed. Any other tag or expression is
refused with its file and line; the files are then left unchanged.
"""
import argparse
import ast
import operator
import re
import sys

import yaml

EVAL_TAG = re.compile(r"""!!python/object/apply:eval\s*\[\s*(?P<quote>["'])(?P<expr>.*?)(?P=quote)\s*\]""")
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv}
FUNCTIONS = {"int": int, "round": round}


class UnsupportedExpression(ValueError):
    pass


def _number(node, names):
    """Value of an arithmetic expression over numeric constants and ``names``."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        return BINARY[type(node.op)](_number(node.left, names), _number(node.right, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_number(node.operand, names)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and len(node.args) == 1 and not node.keywords):
        return FUNCTIONS[node.func.id](_number(node.args[0], names))
    raise UnsupportedExpression(f"unsupported expression {ast.unparse(node)!r}")


def evaluate_list(expression):
    """The list that ``expression`` denotes, computed without ``eval``.

    Supported: ``[1, 2.5, ...]`` and ``[<arithmetic of x> for x in range(<int>, <int>[, <int>])]``.
    """
    try:
        node = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError as e:
        raise UnsupportedExpression(f"not a Python expression: {expression!r}") from e
    if isinstance(node, ast.List):
        return [_number(element, {}) for element in node.elts]
    if isinstance(node, ast.ListComp) and len(node.generators) == 1:
        loop = node.generators[0]
        if (isinstance(loop.target, ast.Name) and not loop.ifs and not loop.is_async
                and isinstance(loop.iter, ast.Call) and isinstance(loop.iter.func, ast.Name)
                and loop.iter.func.id == "range" and 1 <= len(loop.iter.args) <= 3 and not loop.iter.keywords):
            bounds = [_number(arg, {}) for arg in loop.iter.args]
            if all(type(b) is int for b in bounds) and len(range(*bounds)) <= 10000:
                return [_number(node.elt, {loop.target.id: x}) for x in range(*bounds)]
    raise UnsupportedExpression(f"only number lists and list comprehensions over range() convert: {expression!r}")


def convert_text(text, filename="<config>"):
    """``text`` with every ``!!python/object/apply:eval [...]`` replaced by its literal list.

    Raises:
        UnsupportedExpression: naming ``filename`` and the line, for an expression that is not
            supported, or a tag other than the eval lists left in the result.
    """
    def literal(match):
        try:
            return "[" + ", ".join(repr(v) for v in evaluate_list(match.group("expr"))) + "]"
        except UnsupportedExpression as e:
            line = text.count("\n", 0, match.start()) + 1
            raise UnsupportedExpression(f"{filename}, line {line}: {e}") from None

    converted = EVAL_TAG.sub(literal, text)
    try:
        yaml.safe_load(converted)
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else "?"
        raise UnsupportedExpression(f"{filename}, line {line}: {e.problem}; convert it by hand") from None
    return converted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="config files, rewritten in place")
    parser.add_argument("--output", help="write the converted file here instead (one input only)")
    args = parser.parse_args(argv)
    if args.output and len(args.files) != 1:
        parser.error("--output takes exactly one input file")
    try:
        converted = {}
        for filename in args.files:
            with open(filename) as f:
                converted[filename] = convert_text(f.read(), filename)
    except (UnsupportedExpression, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for filename, text in converted.items():
        with open(args.output or filename, "w") as f:
            f.write(text)
        print(f"{filename} -> {args.output or filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
