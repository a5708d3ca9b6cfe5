"""Batched MJX versions of the Control Suite's hopper, walker and cheetah with randomised torsos."""
