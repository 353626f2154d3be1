"""Everything beyond the lesson: experiments and verify, bench, GPT-2 interop, PEFT,
rewinding, packed rows and DPO diagnostics, CPU tuning, charts. Run a module from the
repository root, e.g. `python -m extras.experiments verify`."""
