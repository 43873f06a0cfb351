"""The service: streams in, decisions, pulses out, everything recorded.

The way of a pulse, one module per step::

    LSL chunk ──> streams.reader (acquisition thread, ring buffer)
              ──> control.realtime (in that thread) ──> control.pipeline.EegPipeline
                                         (ring read, clock guard; offline: a recording's blocks)
              ──> control.core.DecisionCore (filters, estimator, amplitude gate,
                                             control.trigger_policy.decide)
              ──> stim.scheduler.FireScheduler (fire thread; SimulatedScheduler offline)
              ──> stim.gated.GatedStimulator.fire_now (arm state, the device's truth,
                                                       stim.safety.SafetyGate, the driver)
              ──> control.ledger (pulse records) ──> control.bus (event log, subscribers)

A pulse is decided in :func:`closedloop.control.trigger_policy.decide` (may it fire, and
when) and allowed in :meth:`closedloop.stim.gated.GatedStimulator.fire_now` (may it leave:
nothing else reaches a driver's ``fire``). Every decision has an id (``decision_id``) that
its pulse request, pulse records and MEP records carry.

Rooms:

- :mod:`.service`: the life cycle: opens the rig, starts the pipeline, the supervisor and
  the control planes, and always disarms and flushes on the way out;
- :mod:`.rig`: everything a session opens (streams, trackers, the gated stimulator, the
  fire thread, recorders), closed again on a failure;
- :mod:`.realtime`, :mod:`.pipeline`, :mod:`.core`: from EEG chunks to decisions, in the
  EEG acquisition thread (the pipeline and core shared with offline mode);
  :mod:`.clock_guard`: no decision on EEG stamped in the future or too old;
- :mod:`.ledger`, :mod:`.records`: outcomes to pulse records; the decision, refusal and
  MEP records (live and offline alike); the session's records on the loop;
- :mod:`.protocols`: ``start``/``stop`` and the MEP-driven protocols' loop;
- :mod:`.supervisor`: watchdog, stimulator faults and reconnection, housekeeping;
- :mod:`.bus`: the event bus (subscribe/unsubscribe);
- :mod:`.api`, :mod:`.commands`, :mod:`.status`: what a control plane (MQTT, SIGHUP) may
  ask and its implementation; planes depend on the protocol, never on the service class;
- :mod:`.hooks`: the one adapter through which the rooms reach each other;
- :mod:`.runtime`: live settings; :mod:`.stats`, :mod:`.logs`, :mod:`.memory`: helpers.
"""
