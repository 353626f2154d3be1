"""Everything beyond the lesson: experiments and verify, bench, GPT-2 interop, PEFT,
rewinding, DPO packing and diagnostics, CPU tuning. Run a module from the repository
root, e.g. `python -m extras.experiments verify`."""
