#!/bin/bash
# The second run of docs/study.md as it was run (issue 25): every command resumes, skipping the cells
# already in study_out2/results.jsonl. Run from the repository root. A cell took 83-2,352 s on the shared
# 2-core machine (results.jsonl: "seconds"); a seed's warm start and explorations are cached for its cells.
set -e
S="nice -n 10 srpo-trl study --budget demo --out study_out2"
$S --jobs 2                                                              # the pre-registered grid, 20 cells
$S --diagnose --grid coverage=1,0.1 seeds=101-105                        # the diagnosis
$S --jobs 2 --grid coverage=1,0.1 noise=0,0.2 samples=4,8 seeds=101-105  # the noise and samples axes
# What docs/study2 holds, from the results file alone:
$S --summarize                                                           # summary.md, the charts
$S --summarize --grid coverage=1,0.1 noise=0,0.2 samples=4,8 seeds=101-105   # summary_axes.md
