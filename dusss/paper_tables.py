"""The paper's Table 1 and Table 2 as typed numbers, to print beside this project's results.

Source: Pan et al., "DuSSS: Dual Semantic Similarity-Supervised Vision-Language
Model for Semi-Supervised Medical Image Segmentation", AAAI 2025, Table 1
(comparison at 25 % and 50 % labels; the 100 % rows are fully supervised) and
Table 2 (ablation at 50 % labels), copied from the paper text in
``shared/paper/DuSSS-AAAI2025.md``. Dice and mIoU are in per cent; ``params_m``
and ``gflops`` are the paper's complexity columns (given only once per method,
in its 25 % block). The paper's own tables disagree in one place: BM-Seg at
50 % with every component is 74.61 Dice in Table 1 and 76.41 in Table 2; both
are kept as printed.
"""
from __future__ import annotations

import io

import pandas as pd

__all__ = ["PAPER_DATASETS", "paper_table1", "paper_table2"]

PAPER_DATASETS = ("QaTa-COV19", "BM-Seg", "MoNuSeg")  # column order of both tables

# method, labels (%), text used, then Dice / mIoU for QaTa-COV19, BM-Seg, MoNuSeg, params (M), GFLOPs
_TABLE1 = """method,labels,text,qata_dice,qata_miou,bmseg_dice,bmseg_miou,monuseg_dice,monuseg_miou,params_m,gflops
U-Net,100,False,79.02,69.46,74.15,60.32,78.66,68.46,14.75,25.19
CLIP,100,True,79.81,70.66,74.49,59.56,79.79,68.27,87.00,57.60
ViLT,100,True,79.63,70.12,73.23,58.22,77.92,67.81,87.40,28.00
MT,25,False,77.88,67.53,66.31,53.35,72.80,56.70,14.75,25.19
CCT,25,False,78.02,67.03,70.66,55.27,74.25,56.55,4.65,8.45
BCP,25,False,74.79,65.26,71.26,55.28,72.06,54.69,1.81,2.28
MC-Net,25,False,74.58,64.26,69.67,53.36,71.53,48.12,1.81,2.28
SS-Net,25,False,67.93,58.13,70.21,54.68,71.80,47.80,1.81,2.28
UCMT,25,False,76.09,64.13,71.22,55.82,75.53,54.82,1.81,2.30
LViT,25,True,78.12,66.75,69.45,54.26,75.69,56.14,29.72,27.08
CMITM,25,True,78.04,65.84,70.63,54.66,75.14,54.28,14.75,25.19
ASG,25,True,77.92,65.09,70.26,54.33,75.69,55.92,14.75,25.19
MGCA,25,True,78.17,67.03,70.19,53.67,76.14,56.22,14.75,25.19
DuSSS,25,True,79.00,68.21,71.48,55.97,76.51,58.08,14.75,25.19
MT,50,False,79.64,71.88,72.31,56.99,75.15,59.64,,
CCT,50,False,80.25,71.69,72.65,60.54,76.23,55.87,,
BCP,50,False,75.57,65.31,74.21,61.25,72.17,50.88,,
MC-Net,50,False,74.98,61.97,73.37,60.74,71.59,48.75,,
SS-Net,50,False,68.37,56.73,73.59,60.89,73.05,49.88,,
UCMT,50,False,77.81,68.65,74.32,60.41,76.36,59.29,,
LViT,50,True,80.32,72.16,73.15,60.14,76.57,65.44,,
CMITM,50,True,81.33,72.84,74.96,60.18,77.63,66.31,,
ASG,50,True,80.47,71.84,74.22,59.47,76.79,65.91,,
MGCA,50,True,81.24,73.56,75.17,61.49,77.06,65.23,,
DuSSS,50,True,82.52,75.87,74.61,61.08,78.03,66.93,,
"""

# Table 2 at 50 % labels: SSS, DCL (= CMC + IMC), L_tg switched on (1) or off (0)
_TABLE2 = """sss,dcl,tg,qata_dice,qata_miou,bmseg_dice,bmseg_miou,monuseg_dice,monuseg_miou
0,0,0,79.64,71.88,72.31,56.99,75.15,59.64
1,0,0,80.86,72.33,74.34,60.22,77.25,63.81
0,1,0,80.13,72.31,73.11,60.14,76.90,62.73
1,0,1,81.49,75.25,75.58,60.79,77.53,65.10
0,1,1,81.05,73.80,74.27,60.65,77.10,64.01
1,1,0,81.10,75.08,75.24,59.11,77.74,64.62
1,1,1,82.52,75.87,76.41,61.08,78.03,66.93
"""


def paper_table1() -> pd.DataFrame:
    """The paper's Table 1: one row per (method, labels), Dice / mIoU per data set in per cent, complexity."""
    return pd.read_csv(io.StringIO(_TABLE1))


def paper_table2() -> pd.DataFrame:
    """The paper's Table 2 (50 % labels): switches ``sss``, ``dcl``, ``tg`` and Dice / mIoU per data set in per cent."""
    return pd.read_csv(io.StringIO(_TABLE2))
