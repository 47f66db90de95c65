"""Sampling: sigma schedules, ODE/SDE solvers, NFE planning, the compiled sampling loop and the
dataset-store writer.

The maths lives in small pure modules that know nothing of models or stores:
:mod:`edmcli.sampling.schedules` (sigma discretisations), :mod:`edmcli.sampling.solvers`
(functions of ``(denoise, x_T, sigmas)``) and :mod:`edmcli.sampling.nfe` (network evaluations
to steps). Import the module you need.
"""
