"""The per-page detector as it was before the compact data layer (issue 14): the ORACLE.

A frozen copy of hintscope/analysis/{facts,detector}.py and checks/ at commit ff215b0, with its
imports pointed here.  It expands every harvest, re-arm, hinted page and send to one row per
page and answers each question with per-page as-of joins.  tests/test_analysis_oracle.py runs
it beside ``hintscope.analysis.detector`` on simulated 1 GiB bundles and asserts the same
findings and verdict.  Do not "fix" it: it is the reference the compact path is checked against.
"""
