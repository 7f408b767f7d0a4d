import argparse

from hintscope.schema import markdown

ap = argparse.ArgumentParser(prog="python -m hintscope.schema")
ap.add_argument("--markdown", action="store_true", help="print the table reference of docs/bundle.md")
args = ap.parse_args()
if args.markdown:
    print(markdown())
