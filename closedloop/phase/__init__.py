"""closedloop.phase"""
