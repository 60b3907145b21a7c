import MigrationEngine
import XCTest

/// The prediction is a pure function of measurements: these check it by hand-computed numbers, without a guest.
final class ConvergencePredictionTests: XCTestCase {
    /// A guest that dirties `pagesPerSecond` distinct pages a second, without bound.
    func linear(_ pagesPerSecond: Double, limit: Double = 1e9) -> DirtyCurve {
        DirtyCurve(points: [.init(seconds: 1, pages: pagesPerSecond)], pageLimit: limit)
    }

    func measurements(dataPages: Int = 100_000, dirty: DirtyCurve, rate: Double = 100_000) -> ConvergenceMeasurements {
        ConvergenceMeasurements(dataPages: dataPages, dirty: dirty, pagesPerSecond: rate, laterPagesPerSecond: rate, wireBytesPerPage: 4096,
                                unchangedShareAfterPass0: 0, setupSeconds: 0.05,
                                passOverheadSeconds: 0, switchoverSeconds: 0.01)
    }

    func testTheCurveIsReadBetweenAndBeyondItsPointsUpToItsLimit() {
        let curve = DirtyCurve(points: [.init(seconds: 0.5, pages: 1000), .init(seconds: 0.25, pages: 750)], pageLimit: 2000)
        XCTAssertEqual(curve.points.map(\.seconds), [0.25, 0.5], "sorted")
        XCTAssertEqual(curve.pages(in: 0.125), 375, accuracy: 1e-9, "from the origin to the first point")
        XCTAssertEqual(curve.pages(in: 0.375), 875, accuracy: 1e-9, "between points")
        XCTAssertEqual(curve.pages(in: 1), 1500, accuracy: 1e-9, "beyond: at the last slope, 1000 pages/s")
        XCTAssertEqual(curve.pages(in: 2), 2000, accuracy: 1e-9, "capped at the limit")
        XCTAssertEqual(curve.pages(in: 0.75), 1250, accuracy: 1e-9)
        XCTAssertEqual(curve.pages(in: 0.5, throttle: 0.5), 750, accuracy: 1e-9, "a guest throttled by half runs a quarter second")
        XCTAssertEqual(DirtyCurve(points: [], pageLimit: 10).pages(in: 1), 0)
        var replaced = curve
        replaced.add(.init(seconds: 0.5, pages: 900))
        XCTAssertEqual(replaced.points.count, 2, "a window of a length measured before replaces it")
        XCTAssertEqual(replaced.pages(in: 0.5), 900)
    }

    func testAGuestThatWritesNothingGoesInOnePassAndTheSwitchover() {
        let prediction = ConvergencePrediction.predict(measurements(dirty: linear(0)), options: MigrationOptions())
        XCTAssertTrue(prediction.converges)
        XCTAssertEqual(prediction.passes.count, 1)
        XCTAssertEqual(prediction.finalPages, 0)
        XCTAssertEqual(try XCTUnwrap(prediction.downtimeSeconds), 0.01, accuracy: 1e-9)
        XCTAssertEqual(prediction.totalSeconds, 0.05 + 1 + 0.01, accuracy: 1e-9)
        XCTAssertNil(prediction.afterPass)
    }

    /// 100 000 pages at 100 000 a second, the guest dirtying 10 000 a second: pass 0 takes 1 s and leaves 10 000
    /// pages, whose expected downtime, 0.1 s, is within the default 0.3 s.
    func testPassesAreSimulatedUntilThePolicySwitchesOver() {
        let prediction = ConvergencePrediction.predict(measurements(dirty: linear(10_000)), options: MigrationOptions())
        XCTAssertEqual(prediction.passes.map(\.pages), [100_000])
        XCTAssertEqual(prediction.finalPages, 10_000)
        XCTAssertEqual(try XCTUnwrap(prediction.downtimeSeconds), 0.1 + 0.01, accuracy: 1e-9)
        XCTAssertEqual(prediction.totalSeconds, 0.05 + 1 + 0.11, accuracy: 1e-9)

        // With a 50 ms limit, one more pass: 10 000 pages in 0.1 s, which leave 1 000.
        var options = MigrationOptions()
        options.downtimeLimit = 0.05
        let tighter = ConvergencePrediction.predict(measurements(dirty: linear(10_000)), options: options)
        XCTAssertEqual(tighter.passes.map(\.pages), [100_000, 10_000])
        XCTAssertEqual(tighter.finalPages, 1000)
        XCTAssertEqual(tighter.totalSeconds, 0.05 + 1 + 0.1 + 0.01 + 0.01, accuracy: 1e-9)
    }

    /// The guest dirties twice what the link carries: without auto-converge the dirty set never shrinks, and the
    /// policy's reason for giving up is the prediction's; with it, throttling brings the guest within reach.
    func testAGuestFasterThanTheLinkConvergesOnlyThrottled() {
        var options = MigrationOptions()
        options.autoConverge = false
        let m = measurements(dataPages: 100_000, dirty: linear(20_000, limit: 50_000), rate: 10_000)
        let stalled = ConvergencePrediction.predict(m, options: options)
        XCTAssertFalse(stalled.converges)
        XCTAssertNil(stalled.downtimeSeconds)
        XCTAssertTrue(try XCTUnwrap(stalled.failure).contains("stalled"), stalled.failure ?? "")

        let throttled = ConvergencePrediction.predict(m, options: MigrationOptions())
        XCTAssertTrue(throttled.converges, throttled.failure ?? "")
        XCTAssertGreaterThan(throttled.throttle, 0.5)
        XCTAssertLessThanOrEqual(try XCTUnwrap(throttled.downtimeSeconds), MigrationOptions().downtimeLimit + 0.01 + 1e-9)
    }

    /// A prediction made after pass 0, from measurements that pass 0 confirmed, ends where the first one did.
    func testAPredictionAfterAPassContinuesTheFirst() {
        var options = MigrationOptions()
        options.downtimeLimit = 0.05
        let m = measurements(dirty: linear(10_000))
        let first = ConvergencePrediction.predict(m, options: options)
        var pass0 = PassStatistics(pass: 0)
        pass0.pagesSent = 100_000
        pass0.wireBytes = 100_000 * 4096
        pass0.seconds = 1
        pass0.dirtyPages = 10_000
        pass0.estimate(totalBytes: pass0.wireBytes, bytesPerDirtyPage: 4096, earlier: [])
        let refined = m.refined(by: [pass0], setupSeconds: 0.05, harvestSeconds: 0)
        XCTAssertEqual(refined.pagesPerSecond, 100_000, accuracy: 1e-6)
        XCTAssertEqual(refined.dirty.pages(in: 1), 10_000, accuracy: 1e-6)
        let later = ConvergencePrediction.predict(refined, options: options, history: [pass0], elapsed: 1.05)
        XCTAssertEqual(later.afterPass, 0)
        XCTAssertEqual(later.passes.map(\.pages), [10_000])
        XCTAssertEqual(later.totalSeconds, first.totalSeconds, accuracy: 1e-9)
    }

    /// What a migration measured overrides what was measured beforehand: a link half as fast, a guest twice as busy.
    func testPassesRefineTheMeasurements() {
        let m = measurements(dirty: linear(10_000))
        var pass0 = PassStatistics(pass: 0)
        pass0.pagesSent = 110_000
        pass0.zeroPages = 10_000
        pass0.wireBytes = 100_000 * 2048
        pass0.seconds = 2.01
        pass0.dirtyPages = 40_000
        let refined = m.refined(by: [pass0], setupSeconds: 0.2, harvestSeconds: 0.005)
        XCTAssertEqual(refined.pagesPerSecond, 50_000, accuracy: 1e-6, "100 000 pages with data in 2 s of sending")
        XCTAssertEqual(refined.wireBytesPerPage, 2048, accuracy: 1e-9)
        XCTAssertEqual(refined.passOverheadSeconds, 0.01, accuracy: 1e-12)
        XCTAssertEqual(refined.setupSeconds, 0.2)
        XCTAssertEqual(refined.dirty.pages(in: 2.01), 40_000, accuracy: 1e-6)
        XCTAssertEqual(refined.dirty.pages(in: 1), 10_000, accuracy: 1e-6, "the earlier window stays")
    }

    /// Half of what pass 0 leaves dirty goes unchanged in the next pass, at no cost: that pass takes half the time,
    /// and two rates tell fresh memory from memory the receiver holds.
    func testThePassAfterPass0CostsOnlyItsChangedPagesAtTheLaterRate() {
        var m = measurements(dirty: linear(10_000))
        m.unchangedShareAfterPass0 = 0.5
        m.laterPagesPerSecond = 200_000
        var options = MigrationOptions()
        options.downtimeLimit = 0.01
        let prediction = ConvergencePrediction.predict(m, options: options)
        XCTAssertEqual(prediction.passes.map(\.pages), [100_000, 10_000])
        XCTAssertEqual(prediction.passes[1].seconds, 5_000.0 / 200_000, accuracy: 1e-9)
        XCTAssertEqual(prediction.finalPages, 250)
        XCTAssertEqual(try XCTUnwrap(prediction.downtimeSeconds), 250.0 / 200_000 + 0.01, accuracy: 1e-9, "unchanged pages are pass 1's only")

        var pass1 = PassStatistics(pass: 1)
        pass1.pagesSent = 1000
        pass1.unchangedPages = 300
        pass1.seconds = 0.01
        XCTAssertEqual(m.refined(by: [pass1], setupSeconds: 0, harvestSeconds: 0).unchangedShareAfterPass0, 0.3, accuracy: 1e-12)
    }

    func testNoMeasuredRateIsNoPrediction() {
        let prediction = ConvergencePrediction.predict(measurements(dirty: linear(0), rate: 0), options: MigrationOptions())
        XCTAssertFalse(prediction.converges)
    }
}
