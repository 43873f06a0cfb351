"""closedloop.stim"""
