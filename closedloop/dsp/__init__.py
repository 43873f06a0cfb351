"""closedloop.dsp"""
