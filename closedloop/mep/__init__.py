"""closedloop.mep"""
