"""Data for DuSSS: the LViT-layout reader, text from masks, embedded data sets, splits, augmentation.

``LViTDataset`` reads QaTa-COV19, MoNuSeg, BM-Seg (after ``prepare``) and any
own 2-D data in the LViT layout; ``ensure_dataset(cfg)`` makes the embedded
``qata-synth`` and ``nuclei-real`` sets on first use; ``describe_*`` write the
reports from masks; ``split_labelled``/``save_split``/``load_split`` give the
published labelled subsets; ``JointAugment`` transforms image, mask, report and
cached maps together. Every data set is one ``DatasetSpec`` in
:mod:`dusss.data.registry` (``DATASETS``, ``register_dataset``), which all of
these read.
"""
from .augment import POLICIES, JointAugment, apply_params, transform_text
from .layout import (SPLITS, DataError, LViTDataset, Sample, load_pair, read_image, read_mask, read_text_table,
                     scan_split, split_dir, text_file, write_text_table)
from .nuclei import generate_nuclei_real
from .prepare import (EMBEDDED, REAL, check_dataset, default_augment, ensure_dataset, open_split, prepare_bmseg,
                      prepare_qata, resolve_dataset, text_mode_for)
from .registry import DATASETS, GRAMMARS, DatasetSpec, GrammarSpec, get_dataset, register_dataset, register_grammar
from .splits import load_split, save_split, split_for, split_labelled, split_path
from .synth import draw_chest_xray, generate_qata_synth
from .text import (describe_bmseg, describe_monuseg, describe_qata, flip_report, paraphrase, parse_qata,
                   render_qata, rotate_report)

__all__ = [
    "DATASETS", "GRAMMARS", "DatasetSpec", "GrammarSpec", "get_dataset", "register_dataset", "register_grammar",
    "LViTDataset", "DataError", "Sample", "SPLITS", "scan_split", "split_dir", "text_file", "read_text_table",
    "write_text_table", "read_image", "read_mask", "load_pair",
    "ensure_dataset", "resolve_dataset", "open_split", "text_mode_for", "default_augment", "EMBEDDED", "REAL",
    "prepare_qata", "prepare_bmseg", "check_dataset", "generate_nuclei_real",
    "describe_qata", "describe_monuseg", "describe_bmseg", "paraphrase", "parse_qata", "render_qata",
    "flip_report", "rotate_report",
    "split_labelled", "save_split", "load_split", "split_path", "split_for",
    "JointAugment", "apply_params", "transform_text", "POLICIES",
    "generate_qata_synth", "draw_chest_xray",
]
