"""closedloop.sim"""
