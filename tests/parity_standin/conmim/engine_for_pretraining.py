"""Test stand-in for ConMIM's engine_for_pretraining.py: same train_one_epoch signature and data layout
((student view, teacher view, mask), label); in-image patch InfoNCE at masked positions, then the parameter EMA."""
import torch
import torch.nn.functional as F


def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, momentum_schedule, model_copy,
                    model_copy_without_ddp, temp, max_norm=0, log_writer=None, lr_scheduler=None, start_steps=None,
                    lr_schedule_values=None, wd_schedule_values=None):
    model.train()
    for step, ((samples, samples_aug, mask), _) in enumerate(data_loader):
        it = start_steps + step
        mask = mask.flatten(1).bool()
        flags = dict(return_all_tokens=True, only_return_before_head=True, use_mlp_projectors=True)
        with torch.no_grad():
            k = F.normalize(model_copy(samples_aug, bool_masked_pos=torch.zeros_like(mask), **flags), dim=-1)
        q = F.normalize(model(samples, bool_masked_pos=mask, **flags), dim=-1)
        logits = (q @ k.transpose(1, 2) / temp)[mask]                              # (masked, N)
        labels = torch.arange(mask.shape[1]).expand_as(mask)[mask]
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss_scaler(loss, optimizer, clip_grad=max_norm, parameters=model.parameters())
        with torch.no_grad():
            m = momentum_schedule[it]
            teacher = dict(model_copy_without_ddp.named_parameters())
            for name, p in model.module.named_parameters():
                if name in teacher:
                    teacher[name].mul_(m).add_((1 - m) * p.detach())
        torch.cuda.synchronize()   # as the released engine does (parity.py makes it a no-op without a GPU)
    return {}
