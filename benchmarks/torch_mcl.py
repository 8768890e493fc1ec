"""A PyTorch MCL training step written the way the official code runs it, for timing.

The official repository cannot be fetched where CI runs, so this is our own PyTorch port of
what its `main_cifar.py` executes per step (docs/SPEC.md, section 2.1): M independent CIFAR
ResNets (`ResNet_n`: conv1-bn1-relu, three BasicBlock groups, average pool, `classifier`),
one projection head per member (Linear-ReLU-Linear, L2 normalisation), cross-entropy of
every member plus the four in-batch MCL terms, and `torch.optim.SGD` (momentum 0.9,
Nesterov, weight decay 5e-4) over the networks and the heads. It is used only by
`benchmarks/cpu_vs_torch.py`; the loss values are checked against the JAX loss in
tests/test_benchmarks_cpu.py so a timing never compares two different computations.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class CifarResNet(nn.Module):
  """The official `ResNet` of models/resnet.py with BasicBlocks (resnet32: 5-5-5)."""

  def __init__(self, blocks=(5, 5, 5), num_classes: int = 100, in_channels: int = 3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    layers, inplanes = [], 16
    for i, (planes, n) in enumerate(zip((16, 32, 64), blocks)):
      group = []
      for j in range(n):
        group.append(BasicBlock(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1))
        inplanes = planes
      layers.append(nn.Sequential(*group))
    self.layer1, self.layer2, self.layer3 = layers
    self.classifier = nn.Linear(64, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return self.classifier(features), features


class Head(nn.Module):
  """The official `Embed`: Linear(F, d) - ReLU - Linear(d, d), then L2 normalisation."""

  def __init__(self, dim_in: int = 64, dim_out: int = 128):
    super().__init__()
    self.proj_head = nn.Sequential(
      nn.Linear(dim_in, dim_out), nn.ReLU(inplace=True), nn.Linear(dim_out, dim_out)
    )

  def forward(self, x):
    x = self.proj_head(x)
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def _kl(student, teacher, T):
  return (
    F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher / T, 1), reduction="batchmean") * T**2
  )


def _supcon(logits, pos_mask, diag_mask):
  log_prob = logits - torch.log((torch.exp(logits) * diag_mask).sum(1, keepdim=True))
  return -((pos_mask * log_prob).sum(1) / pos_mask.sum(1)).mean()


def mcl_terms(z, labels, tau: float = 0.1, kd_temperature: float = 3.0):
  """(vcl, icl, soft_vcl, soft_icl) of embeddings z (a list of M [B, d]), as SupMCL."""
  same = (labels[None, :] == labels[:, None]).float()
  eye = torch.eye(len(labels), device=labels.device)
  pos, diag = same - eye, 1.0 - eye
  m = len(z)
  intra = [z[a] @ z[a].T / tau for a in range(m)]
  vcl = sum(_supcon(s, pos, diag) for s in intra)
  soft_vcl = sum(
    _kl(intra[a], intra[b].detach(), kd_temperature) for a in range(m) for b in range(m) if a != b
  )
  icl = soft_icl = 0.0
  for a in range(m):
    for b in range(m):
      if a != b:
        s_ab, s_ba = z[a] @ z[b].T / tau, z[b] @ z[a].T / tau
        icl = icl + _supcon(s_ab, pos, diag)
        soft_icl = soft_icl + _kl(s_ab, s_ba.detach(), kd_temperature)
  return vcl, icl, soft_vcl, soft_icl


class Cohort(nn.Module):
  """M independent networks and their heads (the official M = 2 layout, any M)."""

  def __init__(
    self, members: int = 2, blocks=(5, 5, 5), num_classes: int = 100, in_channels: int = 3
  ):
    super().__init__()
    self.nets = nn.ModuleList(CifarResNet(blocks, num_classes, in_channels) for _ in range(members))
    self.heads = nn.ModuleList(Head(64, 128) for _ in range(members))

  def forward(self, x):
    outs = [net(x) for net in self.nets]
    logits = [o[0] for o in outs]
    z = [head(o[1]) for head, o in zip(self.heads, outs)]
    return logits, z


def make_step(cohort: Cohort, *, lr: float = 0.1, mcl: bool = True):
  """One training step as main_cifar.py: CE of every member + 0.1 VCL + 0.1 ICL + SoftVCL +
  SoftICL, SGD(0.9, Nesterov, wd 5e-4) over networks and heads. Returns step(x, y) -> loss."""
  opt = torch.optim.SGD(cohort.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    logits, z = cohort(x)
    loss = sum(F.cross_entropy(logit, y) for logit in logits)
    if mcl:
      vcl, icl, soft_vcl, soft_icl = mcl_terms(z, y)
      loss = loss + 0.1 * vcl + 0.1 * icl + soft_vcl + soft_icl
    loss.backward()
    opt.step()
    return loss

  return step
