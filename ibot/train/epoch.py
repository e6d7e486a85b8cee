"""One iBOT training epoch: the step over every batch, the monitors, the averaged statistics.

:func:`run_epoch` drives an :class:`~ibot.train.step.iBOTTrainStep`; :func:`train_one_epoch` keeps
the official signature (``main_ibot.train_one_epoch(student, teacher, teacher_without_ddp, ibot_loss,
data_loader, optimizer, lr_schedule, wd_schedule, momentum_schedule, epoch, fp16_scaler, args)``) as
an adapter that builds the step and the run context from its arguments.
"""
import torch

from ibot.data.device_augment import prepare_crops
from ibot.eval.cluster_metrics import eval_pred
from ibot.train.context import info_from_args, make_context
from ibot.train.flags import complete_args
from ibot.train.step import NonFiniteWatch, iBOTTrainStep
from ibot.utils.distributed import concat_all_gather
from ibot.utils.metric_logger import MetricLogger

__all__ = ["run_epoch", "train_one_epoch"]


def run_epoch(step, data_loader, optimizer, schedules, epoch, *, epochs, print_freq=10, has_labels=True):
    """Train ``step`` for one epoch over ``data_loader`` (batches ``(crops, labels, masks)``, plus the
    crops' colour parameters with ``--data_pipeline device``; see ``ibot.data.device_augment.prepare_crops``).

    ``schedules``: ``(lr, wd, momentum)`` per-iteration arrays indexed by ``len(data_loader) * epoch + i``.
    Returns the averaged ``{loss, cls, patch, lr, wd, acc}`` (+ ``koleo``) and, when the data set has
    labels, the clustering monitors ``nmi, ari, fscore, adjacc`` of the teacher's crop-0 argmax.
    """
    device, reference = step.device, step.reference
    metric_logger = MetricLogger(delimiter="  ")
    header = f"Epoch: [{epoch}/{epochs}]"
    watch = NonFiniteWatch(device)
    pred_labels, real_labels = [], []

    # a mid-epoch resume (ibot.train.faults.StepBoundaryLoader) yields the epoch's batches from start_iter on
    start_iter = getattr(data_loader, "start_iter", 0)
    for i, (images, labels, masks, *params) in enumerate(metric_logger.log_every(data_loader, print_freq, header),
                                                         start=start_iter):
        it = len(data_loader) * epoch + i
        # float crops are moved; uint8 crops (--data_pipeline fast|device) are normalised / augmented there
        images = prepare_crops(images, params[0] if params else None, device)
        losses, t_cls, s_cls, grad_norm = step.train_step(optimizer, images, masks, it, epoch, schedules)

        # monitor: agreement of teacher (crop 0) and student (crop 1) argmax, official (quirk Q26)
        batch = labels.shape[0]
        pred1 = t_cls[:batch].argmax(dim=-1)
        pred2 = s_cls[batch:2 * batch].argmax(dim=-1)
        if reference:  # official: gather every step
            pred1, pred2 = concat_all_gather(pred1), concat_all_gather(pred2)
            real_labels.append(concat_all_gather(labels.to(device)))
        else:
            real_labels.append(labels)
        pred_labels.append(pred1)

        if not reference:
            watch.update(it, losses, grad_norm)
        metric_logger.update(loss=losses["loss"].detach())
        metric_logger.update(cls=losses["cls"].detach(), patch=losses["patch"].detach())
        if "koleo" in losses:
            metric_logger.update(koleo=losses["koleo"])
        metric_logger.update(lr=optimizer.param_groups[0]["lr"], wd=optimizer.param_groups[0]["weight_decay"])
        metric_logger.update(acc=(pred1 == pred2).float().mean())
        if not reference and (i % print_freq == 0 or i == len(data_loader) - 1):
            watch.check(epoch, schedules[0], step.ibot_loss)

    stats = _epoch_monitors(pred_labels, real_labels, reference, has_labels)
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return_dict = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    return_dict.update(stats)
    return return_dict


def train_one_epoch(student, teacher, teacher_without_ddp, ibot_loss, data_loader, optimizer, lr_schedule,
                    wd_schedule, momentum_schedule, epoch, fp16_scaler, args):
    """Official signature: one epoch with the step of ``args`` (completed from the parser's defaults;
    fp16 when a ``fp16_scaler`` is given and ``--precision`` is unset). Returns :func:`run_epoch`'s stats."""
    args = complete_args(args)
    precision = args.precision or ("fp16" if fp16_scaler is not None else "fp32")
    ctx = make_context(args, info_from_args(args), precision=precision)
    step = iBOTTrainStep.from_args(student, teacher, teacher_without_ddp, ibot_loss, args, ctx, fp16_scaler)
    dataset = getattr(data_loader, "dataset", None)
    return run_epoch(step, data_loader, optimizer, (lr_schedule, wd_schedule, momentum_schedule), epoch,
                     epochs=args.epochs, print_freq=args.print_freq,
                     has_labels=getattr(dataset, "has_labels", True))


def _epoch_monitors(pred_labels, real_labels, gathered, has_labels):
    """NMI/ARI/F of the teacher's crop-0 argmax against the folder labels, over the whole epoch."""
    if not pred_labels or not has_labels:
        return {}
    pred = torch.cat(pred_labels)
    real = torch.cat([r.to(pred.device) for r in real_labels])
    if not gathered:
        pred, real = concat_all_gather(pred), concat_all_gather(real)
    pred, real = pred.cpu().numpy(), real.cpu().numpy()
    nmi, ari, fscore, adjacc = eval_pred(real, pred, calc_acc=False)
    print(f"NMI: {nmi}, ARI: {ari}, F: {fscore}, ACC: {adjacc}")
    return {"nmi": nmi, "ari": ari, "fscore": fscore, "adjacc": adjacc}
