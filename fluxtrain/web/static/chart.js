// The loss chart: every step's raw loss and its exponential moving average, on one <canvas>.

const SMOOTHING = 0.9;
const PAD = { left: 56, right: 12, top: 12, bottom: 28 };

function niceTicks(min, max, count) {
  const span = max - min || Math.abs(max) || 1;
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(v);
  return ticks;
}

function label(value) {
  if (value === 0) return "0";
  const abs = Math.abs(value);
  return abs >= 1000 || abs < 0.01 ? value.toExponential(1) : String(+value.toPrecision(3));
}

export class LossChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.steps = [];
    this.raw = [];
    this.smooth = [];
    this.totalSteps = null;
    this.frame = 0;
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  /** Add one step's loss; a step seen before (a resumed run replays none, but be safe) is replaced. */
  add(step, loss) {
    if (typeof loss !== "number" || !Number.isFinite(loss)) return;
    const last = this.steps.length - 1;
    if (last >= 0 && step <= this.steps[last]) {
      const at = this.steps.indexOf(step);
      if (at >= 0) this.raw[at] = loss;
      return;
    }
    const previous = this.smooth.length ? this.smooth[this.smooth.length - 1] : loss;
    this.steps.push(step);
    this.raw.push(loss);
    this.smooth.push(this.smooth.length ? SMOOTHING * previous + (1 - SMOOTHING) * loss : loss);
    this.canvas.dataset.points = String(this.steps.length);
    this.schedule();
  }

  schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  draw() {
    const { canvas } = this;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const style = getComputedStyle(canvas);
    ctx.font = `12px ${style.fontFamily}`;
    ctx.fillStyle = style.color;
    if (!this.steps.length) {
      ctx.fillText("waiting for the first step…", PAD.left, height / 2);
      return;
    }
    const xMax = Math.max(this.totalSteps || 0, this.steps[this.steps.length - 1], 2);
    const xMin = Math.min(this.steps[0], 1);
    let yMin = Math.min(...this.raw);
    let yMax = Math.max(...this.raw);
    if (yMin === yMax) {
      yMin -= Math.abs(yMin) * 0.1 || 1;
      yMax += Math.abs(yMax) * 0.1 || 1;
    }
    const plotW = width - PAD.left - PAD.right;
    const plotH = height - PAD.top - PAD.bottom;
    const x = (s) => PAD.left + ((s - xMin) / (xMax - xMin)) * plotW;
    const y = (v) => PAD.top + (1 - (v - yMin) / (yMax - yMin)) * plotH;

    ctx.strokeStyle = style.getPropertyValue("--grid") || "#ddd";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const tick of niceTicks(yMin, yMax, 4)) {
      ctx.beginPath();
      ctx.moveTo(PAD.left, y(tick));
      ctx.lineTo(width - PAD.right, y(tick));
      ctx.stroke();
      ctx.fillText(label(tick), PAD.left - 6, y(tick));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const tick of niceTicks(xMin, xMax, Math.max(2, Math.floor(plotW / 80)))) {
      if (Number.isInteger(tick)) ctx.fillText(String(tick), x(tick), height - PAD.bottom + 6);
    }

    const line = (values, color, widthPx) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = widthPx;
      ctx.beginPath();
      values.forEach((v, i) => (i ? ctx.lineTo(x(this.steps[i]), y(v)) : ctx.moveTo(x(this.steps[i]), y(v))));
      if (values.length === 1) ctx.arc(x(this.steps[0]), y(values[0]), 2, 0, 2 * Math.PI);
      ctx.stroke();
    };
    line(this.raw, style.getPropertyValue("--raw") || "#9bb", 1);
    line(this.smooth, style.getPropertyValue("--smooth") || "#06c", 2);
  }
}
